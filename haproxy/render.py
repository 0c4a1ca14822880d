"""The template filled in for one node's settings.

The template is `oddsgate.cfg.tmpl` beside this module, a string.Template so
that it stays a readable HAProxy file an SRE can review. Its `log-format`
is one of REQUEST_LOG_FORMATS below, and either redacts session tokens from
every request line HAProxy logs. What renders
here is always run through `haproxy -c` (check.py) before anyone starts or
reloads HAProxy with it: a typo must fail the deploy step, not leave the
node without a load balancer.
"""

from __future__ import annotations

import os
from pathlib import Path
from string import Template

from haproxy.errors import HAProxyError
from haproxy.settings import HAProxySettings, address

TEMPLATE_PATH = Path(__file__).resolve().parent / "oddsgate.cfg.tmpl"
BACKEND = "gateway"  # the template's backend: the one whose servers are the workers
CLICKS_BACKEND = "clicks"  # the workers' click listeners, for /t/ (gateway/clicklistener.py)

# The request URI with the value of every `token=` / `og_session=` query
# parameter (any case, `;` or `&` separated, a name with %-escapes too)
# replaced by REDACTED. Both layouts log the request through this.
_REDACTED_URI = (r'capture.req.uri,regsub(\"([?&;])([^=&;]*[%][^=&;]*|token|og_session)'
                 r'=[^&;]*\",\"\\1\\2=REDACTED\",gi)')

# The `log-format` line's argument for each OG_LOG_FORMAT, as written in the
# file: one quoted string, `\"` a literal double quote inside it.
REQUEST_LOG_FORMATS = {
    # `option httplog`'s layout, with the request line redacted and the two
    # captured-cookie fields a fixed "-".
    "text": (r'"%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B - - %tsc '
             r'%ac/%fc/%bc/%sc/%rc %sq/%bq %hr %hs \"%HM %[' + _REDACTED_URI + r'] %HV\""'),
    # One JSON object per line. Numbers only where HAProxy always writes an
    # integer (timers are -1 when not reached); `conns` keeps httplog's
    # a/f/b/s/r as a string because retries read "+N" after a redispatch; the
    # URI goes through json() so any byte a client sent is escaped.
    "json": (r'"{\"accept_ts\":%Ts.%ms,\"client\":\"%ci:%cp\",\"frontend\":\"%ft\",'
             r'\"backend\":\"%b\",\"server\":\"%s\",\"TR\":%TR,\"Tw\":%Tw,\"Tc\":%Tc,'
             r'\"Tr\":%Tr,\"Ta\":%Ta,\"status\":%ST,\"bytes\":%B,\"termination\":\"%tsc\",'
             r'\"conns\":\"%ac/%fc/%bc/%sc/%rc\",\"queues\":\"%sq/%bq\",'
             r'\"request\":\"%HM %[' + _REDACTED_URI + r',json(utf8s)] %HV\"}"'),
}


def server_name(index: int) -> str:
    """HAProxy's name for worker `index`, also what agent-send sends (plus a newline)."""
    return f"w{index}"


def server_lines(settings: HAProxySettings) -> list[str]:
    """One `server` line per worker; the shared options are on the template's default-server.

    Behind several nodes each line names its node's agent (agent-addr and
    agent-port override the default-server's), and asks it about the worker
    by the node-local name its agent knows.
    """
    lines = []
    for s in settings.servers():
        line = (f"    server {s.name} {address(s.host, s.port)} id {s.id} "
                f'agent-send "{s.agent_name}\\n"')
        if s.agent_port is not None:
            line += f" agent-addr {s.agent_host} agent-port {s.agent_port}"
        lines.append(line)
    return lines


def click_server_lines(settings: HAProxySettings) -> list[str]:
    """One `server` line per click listener, tracking its worker's server in `gateway`:
    UP, DOWN and the agent's DRAIN are the worker's (no check of its own)."""
    return [f"    server {s.name} {address(s.host, s.port)} id {s.id} "
            f"track {BACKEND}/{settings.tracks(s)}"
            for s in settings.click_servers()]


def load_template(path: str | os.PathLike[str] | None = None) -> str:
    """The template's text; the default is the one shipped in this package."""
    template_path = Path(path) if path is not None else TEMPLATE_PATH
    try:
        return template_path.read_text()
    except OSError as exc:
        raise HAProxyError(f"cannot read the HAProxy template {template_path}: {exc}") from exc


def render(settings: HAProxySettings, template: str | None = None) -> str:
    """The HAProxy config for `settings`; ValueError if a setting is unusable.

    `template` is the template text (default: the shipped one); placeholders
    it lacks are simply unused, unknown ones are a ValueError.
    """
    settings.validate()
    text = load_template() if template is None else template
    if settings.state_file is not None:
        state_global = f"server-state-file {settings.state_file}"
        state_defaults = "load-server-state-from-file global"
    else:
        state_global = "# server-state-file: none, a reload starts every server fresh"
        state_defaults = "load-server-state-from-file none"
    values = {
        "maxconn": str(settings.maxconn),
        "stats_socket": settings.stats_socket,
        "log_level": settings.log_level,
        "request_log_format": REQUEST_LOG_FORMATS[settings.log_format],
        "hard_stop_after": f"{settings.hard_stop_after_s}s",
        "server_state_file": state_global,
        "load_server_state": state_defaults,
        "tunnel_timeout_s": str(settings.tunnel_timeout_s),
        "bind": address(settings.bind_host, settings.bind_port),
        "health_inter_ms": str(settings.health_inter_ms),
        "agent_inter_ms": str(settings.agent_inter_ms),
        "agent_host": settings.agent_host,
        "agent_port": str(settings.agent_port),
        "server_maxconn": (f" maxconn {settings.server_maxconn}"
                           if settings.server_maxconn is not None else ""),
        "servers": "\n".join(server_lines(settings)),
        "click_route": (f"use_backend {CLICKS_BACKEND} if {{ path_beg /t/ }}" if settings.clicks
                        else "# no click listeners: /t/ goes to the gateway backend"),
        "click_servers": "\n".join(click_server_lines(settings)) if settings.clicks
        else "    # none: /t/ goes to the gateway backend",
        "worker_count": str(sum(1 for _ in settings.servers())),
    }
    try:
        return Template(text).substitute(values)
    except KeyError as exc:
        raise ValueError(f"HAProxy template has an unknown placeholder ${exc.args[0]}") from None
    except ValueError as exc:  # a lone "$" not followed by a name
        raise ValueError(f"HAProxy template: {exc} (write a literal dollar as $$)") from None
