"""Attribution: links, click records, conversions (issue 12). Shared names in keys.py."""
