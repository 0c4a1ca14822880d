"""HAProxy in front of a node: the configuration template, how it is rendered and checked.

`settings.py` holds what the template needs and refuses unusable values
before HAProxy sees them; `render.py` fills the template; `check.py` runs
`haproxy -c` on the result. Starting, reloading and supervising the HAProxy
process is the supervisor's (supervisor/haproxy.py).
"""
