"""The vocabulary every other part speaks: tokens, secrets, scopes, names, the clock,
events and encryption. Imports nothing of tokenbroker's but :mod:`tokenbroker.errors`."""
