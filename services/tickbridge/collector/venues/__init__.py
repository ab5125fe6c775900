"""Exchange adapters: what differs per venue behind one boundary (`base.VenueAdapter`), pure and without I/O.

See README.md beside this file for what each venue guarantees and where it differs from Binance.
"""
