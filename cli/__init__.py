"""argparse front ends: parse, validate, call the engine, print."""
