"""python -m sleb [search|eval|heal|latency|report] [--flags]: flags alone run the search (the paper's command)."""

from sleb.commands import main

if __name__ == "__main__":
    main()
