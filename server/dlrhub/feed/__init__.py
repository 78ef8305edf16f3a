"""The live feed: the hub fans committed changes out to Stream subscribers, each subscriber follows
the store and then the hub without a gap, and each change is encoded once for all of them."""
