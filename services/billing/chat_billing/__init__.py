"""The billing service: users, the model catalogue, entitlements, balances held in integer
nano-dollars, reservations that are settled or released, and an append-only ledger."""
