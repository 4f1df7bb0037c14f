"""llm-chat: placeholder until its issue lands."""

import sys


def main(argv=None) -> int:
    print("llm-chat: not yet implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
