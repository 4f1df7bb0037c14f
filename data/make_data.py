"""Write data/pretrain.json and data/chat.json: a small corpus written for this project.

Every sentence comes from the hand-written facts and templates below (no outside text).
The composition is seeded, so running `python data/make_data.py` again gives identical
bytes. The text is deliberately plain and regular: a tiny Transformer trained for a minute
or two on a CPU should pick up its structure, and after instruction tuning answer questions
such as "What is a tokenizer?".
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20241125
PRETRAIN_TARGET_BYTES = 420_000

# ----------------------------------------------------------------------------- concepts
# name -> (definition, facts). The definition answers "What is <name>?".

CONCEPTS = {
    # computers and language models
    "a tokenizer": (
        "A tokenizer splits text into small pieces called tokens, and gives each token a number.",
        [
            "A language model reads and writes these numbers instead of letters.",
            "Common words usually become a single token.",
            "Rare words are split into several smaller tokens.",
            "Many tokenizers are built with byte pair encoding.",
        ],
    ),
    "a token": (
        "A token is a small piece of text, such as a word, part of a word, or a single character.",
        [
            "Each token has its own number, called its id.",
            "A short sentence is often about ten tokens long.",
            "A model sees text as a list of tokens.",
        ],
    ),
    "a language model": (
        "A language model is a program that predicts the next token in a piece of text.",
        [
            "It learns by reading a large amount of text.",
            "To write an answer, it predicts one token at a time.",
            "Each new token is added to the text, and then the model predicts again.",
            "A small language model can run on a laptop.",
        ],
    ),
    "a neural network": (
        "A neural network is a program made of many simple parts that learn from examples.",
        [
            "Each part does a little bit of math.",
            "Together the parts can learn hard tasks, like reading text or seeing pictures.",
            "The network stores what it learns in numbers called weights.",
        ],
    ),
    "a transformer": (
        "A transformer is a kind of neural network that uses attention to read a sequence of "
        "tokens.",
        [
            "Most modern language models are transformers.",
            "A transformer is built from a stack of layers.",
            "Each layer has an attention part and a feed forward part.",
        ],
    ),
    "attention": (
        "Attention lets each token look at the earlier tokens and decide which ones matter most.",
        [
            "It helps a model connect words that are far apart.",
            "In a language model, a token can only look back, never ahead.",
            "Attention is one of the main parts of a transformer.",
        ],
    ),
    "training": (
        "Training is the process of showing a model many examples so that it slowly gets better.",
        [
            "During training, the model makes a guess and then checks the right answer.",
            "After each step, the weights change a little.",
            "Training a big model can take many days.",
        ],
    ),
    "the loss": (
        "The loss is a number that tells a model how wrong its predictions are.",
        [
            "A smaller loss means better predictions.",
            "Training tries to make the loss go down.",
            "People watch the loss to see if training is working.",
        ],
    ),
    "a gradient": (
        "A gradient shows how to change each weight to make the loss a little smaller.",
        [
            "Gradients are found with a method called backpropagation.",
            "The optimizer uses the gradients to update the weights.",
        ],
    ),
    "a weight": (
        "A weight is a number inside a model that is learned during training.",
        [
            "A small model has a few million weights.",
            "A large model can have billions of weights.",
            "The weights are saved to a file when training ends.",
        ],
    ),
    "an embedding": (
        "An embedding is a list of numbers that stands for a token.",
        [
            "Tokens with similar meanings often get similar embeddings.",
            "The model looks up the embedding of each token before it reads the text.",
        ],
    ),
    "a vocabulary": (
        "A vocabulary is the list of all the tokens that a tokenizer knows.",
        [
            "A small vocabulary might have a few thousand tokens.",
            "A bigger vocabulary makes the text shorter in tokens.",
        ],
    ),
    "byte pair encoding": (
        "Byte pair encoding is a way to build a tokenizer by merging the most common pair of "
        "symbols, again and again.",
        [
            "It starts with single bytes, so it can write any text.",
            "Each merge adds one new token to the vocabulary.",
            "It stops when the vocabulary is big enough.",
        ],
    ),
    "a dataset": (
        "A dataset is a collection of examples used to train or test a model.",
        [
            "A good dataset is clean and has many different examples.",
            "Some datasets hold text, and others hold pictures or sounds.",
        ],
    ),
    "a prompt": (
        "A prompt is the text you give a language model so that it can write a reply.",
        [
            "A clear prompt usually gets a better answer.",
            "A question is a very common kind of prompt.",
        ],
    ),
    "temperature": (
        "Temperature controls how random a model is when it picks the next token.",
        [
            "A low temperature makes the model pick the most likely token.",
            "A high temperature makes the text more surprising.",
            "At temperature zero, the same prompt always gives the same answer.",
        ],
    ),
    "a checkpoint": (
        "A checkpoint is a saved copy of a model's weights and settings.",
        [
            "With a checkpoint, training can stop and start again later.",
            "A chat program loads a checkpoint before it can answer.",
        ],
    ),
    "a computer": (
        "A computer is a machine that follows instructions to work with numbers, text and "
        "pictures.",
        [
            "It has a processor, memory and storage.",
            "Computers can do millions of steps every second.",
            "People use computers to write, to play and to talk to friends.",
        ],
    ),
    "a program": (
        "A program is a list of instructions that a computer follows.",
        [
            "Programs are written in programming languages, such as Python.",
            "A mistake in a program is called a bug.",
        ],
    ),
    "a CPU": (
        "A CPU is the part of a computer that runs programs step by step.",
        [
            "CPU stands for central processing unit.",
            "A CPU has a few fast cores.",
        ],
    ),
    "a GPU": (
        "A GPU is a chip that can do many small calculations at the same time.",
        [
            "GPUs were first made to draw pictures for games.",
            "Today GPUs are also used to train neural networks.",
            "A GPU has thousands of small cores.",
        ],
    ),
    "a kernel": (
        "A kernel is a small program that runs on a GPU and does one job, such as adding two "
        "lists of numbers.",
        [
            "Many copies of a kernel run at the same time.",
            "Fast kernels make training much quicker.",
        ],
    ),
    "memory": (
        "Memory is the place where a computer keeps the data it is working on right now.",
        [
            "Memory is fast, but it forgets everything when the power goes off.",
            "A model must fit in memory to run.",
        ],
    ),
    "a file": (
        "A file is a named piece of data that is stored on a disk.",
        [
            "Files are kept in folders.",
            "A text file holds letters and words.",
        ],
    ),
    "the internet": (
        "The internet is a huge network that connects computers all over the world.",
        [
            "People use it to send messages, read news and watch videos.",
            "Data travels through cables and through the air.",
        ],
    ),
    "a bug": (
        "A bug is a mistake in a program that makes it do the wrong thing.",
        [
            "Programmers write tests to find bugs early.",
            "Fixing a bug is called debugging.",
        ],
    ),
    "a password": (
        "A password is a secret word or phrase that keeps an account safe.",
        [
            "A good password is long and hard to guess.",
            "You should not share your password with anyone.",
        ],
    ),
    "a keyboard": (
        "A keyboard is a set of keys that you press to type letters and numbers into a computer.",
        ["Most keyboards have more than one hundred keys."],
    ),
    "a screen": (
        "A screen is the flat part of a computer or phone that shows pictures and text.",
        ["A screen is made of tiny dots of light called pixels."],
    ),
    # nature and science
    "the sun": (
        "The sun is the star at the center of our solar system.",
        [
            "It gives the earth light and heat.",
            "Plants need sunlight to grow.",
            "The sun rises in the east and sets in the west.",
        ],
    ),
    "the moon": (
        "The moon is a large ball of rock that goes around the earth.",
        [
            "It shines because it reflects light from the sun.",
            "It takes about one month to go around the earth once.",
        ],
    ),
    "rain": (
        "Rain is water that falls from clouds in small drops.",
        [
            "Rain fills rivers and lakes.",
            "Plants and animals need rain to live.",
        ],
    ),
    "a cloud": (
        "A cloud is a large group of tiny water drops floating in the sky.",
        [
            "Dark clouds often bring rain.",
            "White clouds on a sunny day are usually harmless.",
        ],
    ),
    "snow": (
        "Snow is frozen water that falls from the sky as soft white flakes.",
        [
            "Snow falls when the air is very cold.",
            "Children like to build snowmen in the snow.",
        ],
    ),
    "wind": (
        "Wind is air that moves from one place to another.",
        [
            "A gentle wind is called a breeze.",
            "Strong wind can bend trees.",
        ],
    ),
    "a rainbow": (
        "A rainbow is a curve of colors that appears when sunlight shines through rain.",
        [
            "A rainbow has red, orange, yellow, green, blue and violet in it.",
            "You see a rainbow when the sun is behind you.",
        ],
    ),
    "a tree": (
        "A tree is a tall plant with a wooden trunk, branches and leaves.",
        [
            "Trees give us shade, fruit and wood.",
            "Some trees live for hundreds of years.",
            "Trees take in air and give out fresh oxygen.",
        ],
    ),
    "a seed": (
        "A seed is a small part of a plant that can grow into a new plant.",
        [
            "A seed needs water, soil and warmth to grow.",
            "Some seeds are tiny, and some are as big as a coconut.",
        ],
    ),
    "a flower": (
        "A flower is the colorful part of a plant that makes seeds.",
        [
            "Bees visit flowers to collect nectar.",
            "Many flowers smell sweet.",
        ],
    ),
    "a river": (
        "A river is a long stream of fresh water that flows to a lake or the sea.",
        [
            "Many towns were built next to rivers.",
            "Fish live in rivers.",
        ],
    ),
    "the ocean": (
        "The ocean is the huge body of salt water that covers most of the earth.",
        [
            "Whales, sharks and many fish live in the ocean.",
            "Ocean water is too salty to drink.",
        ],
    ),
    "a mountain": (
        "A mountain is a very high piece of land with steep sides.",
        [
            "The top of a mountain is called the peak.",
            "It is often cold and windy on a mountain.",
        ],
    ),
    "a forest": (
        "A forest is a large area of land covered with trees.",
        [
            "Many animals live in forests.",
            "Forests help keep the air clean.",
        ],
    ),
    "a desert": (
        "A desert is a dry place that gets very little rain.",
        [
            "Deserts can be very hot in the day and cold at night.",
            "Camels can live in the desert.",
        ],
    ),
    "a star": (
        "A star is a huge ball of hot gas that gives off light.",
        [
            "The sun is a star.",
            "Stars look small because they are very far away.",
        ],
    ),
    "a planet": (
        "A planet is a large round world that moves around a star.",
        [
            "The earth is a planet.",
            "There are eight planets in our solar system.",
        ],
    ),
    "water": (
        "Water is a clear liquid that all living things need.",
        [
            "Water freezes into ice when it is very cold.",
            "Water boils when it is very hot and turns into steam.",
        ],
    ),
    "ice": (
        "Ice is water that has frozen solid.",
        [
            "Ice melts back into water when it gets warm.",
            "Ice floats on water.",
        ],
    ),
    "a volcano": (
        "A volcano is a mountain that can throw out hot melted rock, ash and gas.",
        ["The hot melted rock is called lava."],
    ),
    "thunder": (
        "Thunder is the loud sound that comes after a flash of lightning.",
        ["You see the lightning first because light is faster than sound."],
    ),
    # everyday life
    "bread": (
        "Bread is a food made from flour, water and yeast that is baked in an oven.",
        [
            "People eat bread with butter, cheese or jam.",
            "Fresh bread smells very good.",
        ],
    ),
    "soup": (
        "Soup is a warm liquid food made by cooking vegetables, meat or beans in water.",
        [
            "Soup is nice to eat on a cold day.",
            "You eat soup with a spoon.",
        ],
    ),
    "tea": (
        "Tea is a warm drink made by pouring hot water over dried tea leaves.",
        [
            "Some people add milk or honey to their tea.",
            "Green tea and black tea come from the same plant.",
        ],
    ),
    "breakfast": (
        "Breakfast is the first meal of the day, eaten in the morning.",
        ["A good breakfast gives you energy for the day."],
    ),
    "a kitchen": (
        "A kitchen is the room where people cook and keep their food.",
        ["A kitchen usually has a stove, a sink and a fridge."],
    ),
    "a recipe": (
        "A recipe is a list of steps that tells you how to cook a dish.",
        ["A recipe also says which ingredients you need."],
    ),
    "a library": (
        "A library is a place where you can borrow books and read quietly.",
        ["You need a library card to take books home."],
    ),
    "a school": (
        "A school is a place where children go to learn.",
        ["Teachers help students learn to read, write and count."],
    ),
    "a hospital": (
        "A hospital is a building where doctors and nurses take care of sick people.",
        ["Hospitals are open day and night."],
    ),
    "a bicycle": (
        "A bicycle is a machine with two wheels that you ride by pushing pedals.",
        [
            "Riding a bicycle is good exercise.",
            "You should wear a helmet when you ride.",
        ],
    ),
    "a clock": (
        "A clock is a tool that shows the time.",
        ["There are sixty minutes in one hour."],
    ),
    "a map": (
        "A map is a drawing of a place that shows where things are.",
        ["Maps help people find their way."],
    ),
    "an umbrella": (
        "An umbrella is a folding cover that keeps you dry in the rain.",
        ["You open an umbrella above your head."],
    ),
    "music": (
        "Music is sound made with voices or instruments in a pleasing pattern.",
        ["People sing, dance and relax to music."],
    ),
    "a book": (
        "A book is a set of printed pages with words or pictures, bound together.",
        ["Reading books helps you learn new words."],
    ),
    "a friend": (
        "A friend is a person you like, trust and enjoy spending time with.",
        ["Good friends help each other."],
    ),
}

# ----------------------------------------------------------------------------- tables

# name, plural, size, sound, food, home, feature
ANIMALS = [
    ("cat", "cats", "small", "meow", "fish and meat", "in houses with people", "soft fur"),
    ("dog", "dogs", "friendly", "woof", "meat and dog food", "in houses with people", "a wet nose"),
    ("cow", "cows", "big", "moo", "grass and hay", "on farms", "four stomachs"),
    ("horse", "horses", "big", "neigh", "grass, hay and oats", "on farms", "long legs"),
    ("sheep", "sheep", "gentle", "baa", "grass", "on farms", "thick wool"),
    ("pig", "pigs", "pink", "oink", "almost anything", "on farms", "a flat nose"),
    ("duck", "ducks", "small", "quack", "seeds and bugs", "near ponds", "webbed feet"),
    ("owl", "owls", "quiet", "hoot", "mice and insects", "in trees", "big round eyes"),
    ("frog", "frogs", "small", "ribbit", "flies and bugs", "near ponds", "long back legs"),
    ("lion", "lions", "strong", "roar", "meat", "on the grasslands", "a big mane"),
    ("bee", "bees", "tiny", "buzz", "nectar from flowers", "in hives", "striped wings"),
    ("mouse", "mice", "tiny", "squeak", "seeds and cheese", "in small holes", "a long tail"),
    ("rabbit", "rabbits", "small", "sniff", "carrots and grass", "in burrows", "long ears"),
    ("chicken", "chickens", "small", "cluck", "seeds and grain", "on farms", "feathers"),
    ("elephant", "elephants", "huge", "trumpet", "leaves and grass", "in forests", "a long trunk"),
    ("snake", "snakes", "long", "hiss", "mice and eggs", "in grass and rocks", "no legs"),
    ("goat", "goats", "lively", "bleat", "grass and leaves", "on hills and farms", "a small beard"),
    ("wolf", "wolves", "wild", "howl", "meat", "in forests", "sharp teeth"),
    ("bird", "birds", "small", "tweet", "seeds and worms", "in nests", "two wings"),
    ("bear", "bears", "big", "growl", "berries, fish and honey", "in forests", "thick fur"),
]

# job, what they do, where, tool
JOBS = [
    ("baker", "bakes bread and cakes", "in a bakery", "an oven"),
    ("teacher", "helps children learn", "in a school", "books and a board"),
    ("doctor", "helps sick people get well", "in a hospital", "a stethoscope"),
    ("farmer", "grows food and takes care of animals", "on a farm", "a tractor"),
    ("pilot", "flies airplanes", "in an airplane", "the controls"),
    ("chef", "cooks meals", "in a restaurant kitchen", "sharp knives and pans"),
    ("programmer", "writes programs for computers", "in an office or at home", "a computer"),
    ("nurse", "cares for patients", "in a hospital", "a thermometer"),
    ("firefighter", "puts out fires and keeps people safe", "at a fire station", "a hose"),
    ("painter", "paints pictures or walls", "in a studio", "brushes and paint"),
    ("gardener", "takes care of plants and flowers", "in a garden", "a shovel"),
    ("mechanic", "fixes cars", "in a garage", "a wrench"),
    ("librarian", "looks after books and helps readers", "in a library", "a catalog"),
    ("driver", "drives a bus or a truck", "on the road", "a steering wheel"),
    ("scientist", "asks questions and runs experiments", "in a lab", "a microscope"),
]

COLORS = [
    ("the sky", "is", "blue"),
    ("grass", "is", "green"),
    ("snow", "is", "white"),
    ("a banana", "is", "yellow"),
    ("a carrot", "is", "orange"),
    ("a tomato", "is", "red"),
    ("coal", "is", "black"),
    ("the sun", "looks", "yellow"),
    ("a strawberry", "is", "red"),
    ("a lemon", "is", "yellow"),
    ("a leaf", "is", "green in summer"),
    ("milk", "is", "white"),
    ("chocolate", "is", "brown"),
    ("the ocean", "looks", "blue"),
    ("a plum", "is", "purple"),
    ("an orange", "is", "orange"),
    ("a fire truck", "is", "red"),
    ("a cloud", "is", "white or gray"),
]

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("day", "night"),
    ("open", "closed"),
    ("light", "dark"),
    ("old", "new"),
    ("full", "empty"),
    ("wet", "dry"),
    ("early", "late"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("tall", "short"),
    ("left", "right"),
    ("in", "out"),
    ("first", "last"),
    ("strong", "weak"),
    ("easy", "hard"),
]

NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()

SEASONS = {
    "spring": (
        "mild and often rainy",
        "flowers bloom and birds build nests",
        ["March", "April", "May"],
    ),
    "summer": (
        "hot and sunny",
        "people swim, play outside and eat ice cream",
        ["June", "July", "August"],
    ),
    "autumn": (
        "cool and windy",
        "leaves turn red and yellow and fall from the trees",
        ["September", "October", "November"],
    ),
    "winter": (
        "cold, and it sometimes snows",
        "people wear warm coats and drink hot tea",
        ["December", "January", "February"],
    ),
}

# dish, ingredients, steps
RECIPES = [
    (
        "tea",
        "tea leaves and water",
        [
            "boil some water",
            "put the tea leaves in a cup",
            "pour the hot water over them",
            "wait three minutes and take the leaves out",
        ],
    ),
    (
        "a boiled egg",
        "an egg and water",
        [
            "put the egg in a pot of water",
            "bring the water to a boil",
            "cook the egg for eight minutes",
            "cool it in cold water and peel it",
        ],
    ),
    (
        "toast",
        "a slice of bread and some butter",
        [
            "put the bread in the toaster",
            "wait until it is golden brown",
            "spread butter on the warm toast",
        ],
    ),
    (
        "a salad",
        "lettuce, tomatoes, a cucumber and some oil",
        [
            "wash the vegetables",
            "cut them into small pieces",
            "put them in a bowl",
            "add a little oil and salt and mix",
        ],
    ),
    (
        "pancakes",
        "flour, milk, eggs and a little sugar",
        [
            "mix the flour, milk, eggs and sugar into a smooth batter",
            "heat a pan with some butter",
            "pour in a little batter and cook until bubbles appear",
            "flip the pancake and cook the other side",
        ],
    ),
    (
        "rice",
        "rice, water and a pinch of salt",
        [
            "rinse the rice in cold water",
            "put it in a pot with twice as much water",
            "bring it to a boil, then cover the pot",
            "cook it on low heat for fifteen minutes",
        ],
    ),
    (
        "vegetable soup",
        "carrots, potatoes, an onion, water and salt",
        [
            "chop the vegetables",
            "cook the onion in a little oil",
            "add the other vegetables and water",
            "let the soup simmer for thirty minutes and add salt",
        ],
    ),
    (
        "a sandwich",
        "two slices of bread, cheese and lettuce",
        [
            "lay out the two slices of bread",
            "put the cheese and lettuce on one slice",
            "cover it with the other slice and cut it in half",
        ],
    ),
]

NAMES = ["Anna", "Ben", "Mia", "Leo", "Sara", "Tom", "Lily", "Max", "Nora", "Sam", "Emma", "Jack"]
PLACES = [
    "in a small village",
    "in a quiet town",
    "in a big city",
    "in a house by the sea",
    "on a farm",
    "in a cabin in the woods",
]
OBJECTS = [
    ("a red ball", "the ball"),
    ("a small kite", "the kite"),
    ("a new book", "the book"),
    ("a blue bicycle", "the bicycle"),
    ("a box of paints", "the paints"),
    ("a little robot", "the robot"),
    ("a paper boat", "the boat"),
    ("a warm scarf", "the scarf"),
]
FEELINGS = ["happy", "proud", "excited", "calm", "glad", "cheerful"]

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi!", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! I hope you have a nice day."),
    ("Good night!", "Good night! Sleep well."),
    ("How are you?", "I am fine, thank you. How can I help you?"),
    ("Who are you?", "I am a small language model. I can answer simple questions."),
    ("What are you?", "I am a small language model that was trained on simple English text."),
    ("What is your name?", "I do not have a name. I am a small language model."),
    ("Thank you!", "You are welcome!"),
    ("Thanks for your help.", "You are welcome. I am happy to help."),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("Can you help me?", "Yes, of course. What do you need?"),
    ("Tell me a joke.", "Why did the computer go to the doctor? Because it had a bug."),
    ("Do you like music?", "I cannot hear music, but I know that many people love it."),
    ("Are you a person?", "No, I am not a person. I am a computer program."),
    ("Can you see me?", "No, I cannot see you. I can only read the text you type."),
    ("What can you do?", "I can answer simple questions about words, nature, food and computers."),
    ("Are you smart?", "I am a very small model, so I only know simple things."),
    ("How do you work?", "I read your words as tokens and predict my answer one token at a time."),
    ("Who made you?", "I was trained as part of a small open project called tritonlm."),
]

# ----------------------------------------------------------------------------- helpers


def cap(s: str) -> str:
    """'a tokenizer' -> 'A tokenizer'."""
    return s[:1].upper() + s[1:]


def bare(name: str) -> str:
    """'a tokenizer' -> 'tokenizer'; 'the sun' -> 'sun'."""
    for article in ("a ", "an ", "the "):
        if name.startswith(article):
            return name[len(article) :]
    return name


def topic(name: str) -> str:
    """How to talk about a concept in general: 'a tokenizer' -> 'tokenizers'."""
    if name.startswith("the ") or bare(name) == name:
        return name
    word = bare(name)
    if word.endswith("o"):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def number(n: int) -> str:
    return NUMBERS[n]


# ----------------------------------------------------------------------------- pretraining


def para_concept(rng: random.Random) -> str:
    name = rng.choice(list(CONCEPTS))
    definition, facts = CONCEPTS[name]
    intro = rng.choice(
        [
            "",
            f"Let us learn about {topic(name)}. ",
            f"Here is a short note about {topic(name)}. ",
            f"Do you know what {name} is? ",
            f"This is about {topic(name)}. ",
        ]
    )
    chosen = rng.sample(facts, k=rng.randint(1, len(facts)))
    return intro + definition + " " + " ".join(chosen)


def para_two_concepts(rng: random.Random) -> str:
    a, b = rng.sample(list(CONCEPTS), 2)
    return (
        f"{CONCEPTS[a][0]} {rng.choice(CONCEPTS[a][1])} "
        f"{rng.choice(['In a different way,', 'On the other hand,', 'Also,'])} "
        f"{CONCEPTS[b][0][0].lower() + CONCEPTS[b][0][1:]} {rng.choice(CONCEPTS[b][1])}"
    )


def para_animal(rng: random.Random) -> str:
    name, plural, size, sound, food, home, feature = rng.choice(ANIMALS)
    sentences = [
        f"The {name} is {an(size)} animal.",
        f"{cap(an(name))} says {sound}.",
        f"{cap(plural)} eat {food}.",
        f"{cap(plural)} live {home}.",
        f"{cap(an(name))} has {feature}.",
    ]
    first, rest = sentences[0], sentences[1:]
    rng.shuffle(rest)
    return " ".join([first] + rest[: rng.randint(2, 4)])


def para_animals_compare(rng: random.Random) -> str:
    a, b = rng.sample(ANIMALS, 2)
    return (
        f"{cap(an(a[0]))} says {a[3]}, but {an(b[0])} says {b[3]}. "
        f"{cap(a[1])} eat {a[4]}, and {b[1]} eat {b[4]}. "
        f"{cap(a[1])} live {a[5]}, while {b[1]} live {b[5]}."
    )


def para_job(rng: random.Random) -> str:
    job, does, where, tool = rng.choice(JOBS)
    name = rng.choice(NAMES)
    return rng.choice(
        [
            f"A {job} {does}. A {job} works {where} and uses {tool}.",
            f"{name} is {an(job)}. Every day, {name} works {where}. "
            f"A {job} {does}, and {name} likes this work very much.",
            f"What does a {job} do? A {job} {does}. The most useful tool of a {job} is {tool}.",
        ]
    )


def para_colors(rng: random.Random) -> str:
    picks = rng.sample(COLORS, 4)
    return " ".join(f"{cap(thing)} {verb} {color}." for thing, verb, color in picks)


def para_opposites(rng: random.Random) -> str:
    picks = rng.sample(OPPOSITES, 4)
    return " ".join(f"The opposite of {a} is {b}." for a, b in picks)


def para_numbers(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        start = rng.randint(0, 14)
        seq = [cap(number(start))] + [number(i) for i in range(start + 1, start + 6)]
        return "We can count: " + ", ".join(seq) + "."
    if kind == 1:
        out = []
        for _ in range(4):
            a, b = rng.randint(0, 10), rng.randint(0, 10)
            out.append(f"{cap(number(a))} plus {number(b)} is {number(a + b)}.")
        return " ".join(out)
    out = []
    for _ in range(4):
        a = rng.randint(1, 20)
        b = rng.randint(0, a)
        out.append(f"{cap(number(a))} minus {number(b)} is {number(a - b)}.")
    return " ".join(out)


def para_calendar(rng: random.Random) -> str:
    if rng.random() < 0.5:
        i = rng.randrange(7)
        return (
            f"There are seven days in a week. {DAYS[i]} comes after {DAYS[i - 1]}. "
            f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}. "
            "Saturday and Sunday are the weekend."
        )
    i = rng.randrange(12)
    return (
        f"There are twelve months in a year. {MONTHS[i]} comes after {MONTHS[i - 1]}, "
        f"and {MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}. "
        f"The first month is January and the last month is December."
    )


def para_season(rng: random.Random) -> str:
    season = rng.choice(list(SEASONS))
    weather, life, months = SEASONS[season]
    return (
        f"In {season}, the weather is {weather}. In {season}, {life}. "
        f"The months of {season} are {join_list(months)}."
    )


def para_recipe(rng: random.Random) -> str:
    dish, ingredients, steps = rng.choice(RECIPES)
    words = ["First", "Then", "Next", "After that"]
    body = [f"{words[min(i, 3)]}, {s}." for i, s in enumerate(steps[:-1])]
    body.append(f"Finally, {steps[-1]}.")
    return f"To make {dish}, you need {ingredients}. " + " ".join(body)


def para_story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    friend = rng.choice([n for n in NAMES if n != name])
    place = rng.choice(PLACES)
    thing, the_thing = rng.choice(OBJECTS)
    day = rng.choice(DAYS)
    feeling = rng.choice(FEELINGS)
    season = rng.choice(list(SEASONS))
    weather = {"spring": "mild", "summer": "hot", "autumn": "cool", "winter": "cold"}[season]
    return (
        f"{name} lived {place}. One {day} in {season}, {name} found {thing}. "
        f"It was a {weather} day. {name} showed {the_thing} to {friend}, "
        f"and they played with it all afternoon. In the evening, {name} felt {feeling}."
    )


def para_model_story(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    hundreds = rng.choice([1, 2, 3, 5, 6, 10])
    topic = rng.choice(["animals", "the weather", "cooking", "computers", "nature"])
    return (
        f"{name} wanted to train a small language model. First, {name} collected simple "
        f"text about {topic}. Then {name} trained a tokenizer, which split the text into "
        f"tokens. The model read the tokens and learned to predict the next one. "
        f"After {number(hundreds)} hundred steps, the loss "
        f"was much lower, and the model could write simple sentences."
    )


PARAGRAPHS = [
    (para_concept, 8),
    (para_two_concepts, 2),
    (para_animal, 4),
    (para_animals_compare, 2),
    (para_job, 3),
    (para_colors, 1),
    (para_opposites, 1),
    (para_numbers, 2),
    (para_calendar, 1),
    (para_season, 1),
    (para_recipe, 2),
    (para_story, 3),
    (para_model_story, 1),
]


def make_pretrain(rng: random.Random, target_bytes: int = PRETRAIN_TARGET_BYTES) -> list[str]:
    """Unique paragraphs, drawn by weight, until about `target_bytes` of text."""
    makers = [fn for fn, _ in PARAGRAPHS]
    weights = [w for _, w in PARAGRAPHS]
    seen, out, size = set(), [], 0
    while size < target_bytes:
        text = rng.choices(makers, weights)[0](rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
            size += len(text) + 4
    return out


# ----------------------------------------------------------------------------- chat


def concept_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for name, (definition, facts) in CONCEPTS.items():
        pairs.append((f"What is {name}?", f"{definition} {facts[0]}"))
        pairs.append((f"Can you explain what {name} is?", f"Sure. {definition}"))
        pairs.append((f"Tell me about {topic(name)}.", f"{definition} {' '.join(facts[:2])}"))
        pairs.append(
            (f"What do you know about {topic(name)}?", f"{definition} {rng.choice(facts)}")
        )
        if len(facts) > 1:
            pairs.append((f"Tell me one fact about {topic(name)}.", rng.choice(facts[1:])))
    return pairs


def animal_pairs() -> list[tuple[str, str]]:
    pairs = []
    for name, plural, size, sound, food, home, feature in ANIMALS:
        pairs += [
            (f"What does {an(name)} eat?", f"{cap(plural)} eat {food}."),
            (f"What sound does {an(name)} make?", f"{cap(an(name))} says {sound}."),
            (f"Where do {plural} live?", f"{cap(plural)} live {home}."),
            (f"Tell me about the {name}.", f"The {name} is {an(size)} animal. It has {feature}."),
            (f"What does {an(name)} have?", f"{cap(an(name))} has {feature}."),
        ]
    return pairs


def job_pairs() -> list[tuple[str, str]]:
    pairs = []
    for job, does, where, tool in JOBS:
        pairs += [
            (f"What does a {job} do?", f"A {job} {does}."),
            (f"Where does a {job} work?", f"A {job} works {where}."),
            (f"What tool does a {job} use?", f"A {job} uses {tool}."),
        ]
    return pairs


def small_fact_pairs(rng: random.Random) -> list[tuple[str, str]]:
    pairs = [(f"What color is {t}?", f"{cap(t)} {v} {c}.") for t, v, c in COLORS]
    pairs += [
        (f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES
    ]
    for a in range(11):
        for b in range(11):
            pairs.append(
                (
                    f"What is {number(a)} plus {number(b)}?",
                    f"{cap(number(a))} plus {number(b)} is {number(a + b)}.",
                )
            )
    for _ in range(60):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        pairs.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    for i, day in enumerate(DAYS):
        pairs.append((f"What day comes after {day}?", f"{DAYS[(i + 1) % 7]} comes after {day}."))
        pairs.append((f"What day comes before {day}?", f"{DAYS[i - 1]} comes before {day}."))
    for i, month in enumerate(MONTHS):
        pairs.append(
            (f"What month comes after {month}?", f"{MONTHS[(i + 1) % 12]} comes after {month}.")
        )
        pairs.append(
            (f"What month comes before {month}?", f"{MONTHS[i - 1]} comes before {month}.")
        )
    pairs += [
        ("How many days are in a week?", "There are seven days in a week."),
        ("How many months are in a year?", "There are twelve months in a year."),
        ("What are the days of the weekend?", "Saturday and Sunday are the weekend."),
        ("How many minutes are in an hour?", "There are sixty minutes in one hour."),
    ]
    for season, (weather, life, months) in SEASONS.items():
        pairs += [
            (f"What is the weather like in {season}?", f"In {season}, the weather is {weather}."),
            (f"What happens in {season}?", f"In {season}, {life}."),
            (f"Which months are in {season}?", f"The months of {season} are {join_list(months)}."),
        ]
    for dish, ingredients, steps in RECIPES:
        how = " ".join(f"{cap(s)}." for s in steps)
        pairs += [
            (f"How do I make {dish}?", f"To make {dish}, you need {ingredients}. {how}"),
            (f"What do I need to make {dish}?", f"To make {dish}, you need {ingredients}."),
        ]
    return pairs


def flat(pairs: list[tuple[str, str]], system: str | None = None) -> str:
    head = f"System: {system} " if system else ""
    return head + " ".join(f"User: {q} Assistant: {a}" for q, a in pairs)


def make_chat(rng: random.Random) -> list[str]:
    """Single-turn pairs, plus some multi-turn chats and some with a system message."""
    singles = concept_pairs(rng) + animal_pairs() + job_pairs() + small_fact_pairs(rng) + GREETINGS
    chats = [flat([p]) for p in singles]
    for _ in range(200):
        chats.append(flat(rng.sample(singles, rng.randint(2, 3))))
    systems = [
        "You are a helpful assistant.",
        "You are a friendly assistant. Answer in short, simple sentences.",
        "You are a small language model that answers questions.",
    ]
    for _ in range(80):
        chats.append(flat([rng.choice(singles)], system=rng.choice(systems)))
    # The demo's prompt, kept first so it is easy to find.
    first = flat(
        [("What is a tokenizer?", f"{CONCEPTS['a tokenizer'][0]} {CONCEPTS['a tokenizer'][1][0]}")]
    )
    rest = [c for c in dict.fromkeys(chats) if c != first]
    rng.shuffle(rest)
    return [first] + rest


# ----------------------------------------------------------------------------- output


def dumps(items: list[str]) -> bytes:
    """One JSON string per line, ASCII, newline at the end."""
    return (json.dumps(items, ensure_ascii=True, indent=1) + "\n").encode("ascii")


def build() -> dict[str, bytes]:
    """The bytes of every data file, by file name."""
    return {
        "pretrain.json": dumps(make_pretrain(random.Random(SEED))),
        "chat.json": dumps(make_chat(random.Random(SEED + 1))),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent
    for name, data in build().items():
        (out_dir / name).write_bytes(data)
        print(f"wrote {out_dir / name} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
