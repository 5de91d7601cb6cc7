"""dispatcher: a standalone asyncio dispatcher daemon (Plan -> Execute, concurrency gate)."""

__version__ = "0.1.0"
