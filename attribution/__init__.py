"""The attribution edge (PROTOCOL.md §9-12): links and clicks, conversions,
partner statistics. Records cross between its services only as the streams
and keys named in `attribution.keys`."""
