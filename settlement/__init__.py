"""Settlement of ticket payments on chain, shaped like go-livepeer's pm/ package.

eth.py: the chain client (JSON-RPC, signed transactions). contracts.py: the
Controller lookups and the TicketBroker and BondingManager calls. rounds.py:
the round clock. chain.py: where a node settles (on chain or off).
sender_monitor.py: the max float. winners.py: the durable winner queue.
redeemer.py: redeeming it. deploy.py: the project's contracts as one set.
stakes.py: stake for selection.
"""
