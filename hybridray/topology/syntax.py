"""What a topology value may look like when it becomes a Ray label, a host or a shell word.

Region, zone, accelerator, instance type and Kubernetes names end up in ``ray start --labels
k=v,k=v``, in join scripts, ``ray up`` files and manifests. A value that is not label syntax
either breaks ``ray start`` later (``fra dc2``) or, worse, rewrites other labels
(``us-east-1,hybridray.io/site=onprem`` gives a cloud node on-prem labels). So every such value
is checked here, once, when the cluster file is loaded, against Ray's own label syntax
(``ray/_private/label_utils.py``: ``LABEL_REGEX``, ``validate_label_key``,
``validate_label_value``, which follow Kubernetes) and, for hosts, a host-name/IP syntax. The
patterns are mirrored rather than imported so loading a cluster file does not import Ray;
``tests/topology/test_label_safety.py`` checks they agree with the installed Ray.
"""

from __future__ import annotations

import ipaddress
import re

LABEL_NAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")
LABEL_PREFIX = re.compile(rf"({LABEL_NAME.pattern}?(\.{LABEL_NAME.pattern}?)*)")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")      # Kubernetes namespaces
HOST_PART = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

LABEL_HELP = ("at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter "
              "or digit (Ray's label value syntax)")


def suggest(value: str, allowed: str = r"A-Za-z0-9_.-") -> str:
    """A nearby value that passes, for the error message (empty when none is close)."""
    out = re.sub(rf"[^{allowed}]+", "-", value).strip("-_.")[:63].strip("-_.")
    return out if out and len(out) <= 40 else ""


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a Ray node-label value (None when it is one)."""
    if value == "" or (len(value) <= 63 and LABEL_NAME.fullmatch(value)):
        return None
    hint = suggest(value)
    return (f"must be a Ray label value: {LABEL_HELP} (got {value!r})"
            + (f"; e.g. {hint}" if hint else ""))


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a Ray node-label key (None when it is one)."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not LABEL_PREFIX.fullmatch(prefix)):
        return f"label key {key!r} has a prefix that is not a DNS subdomain"
    if len(name) > 63 or not LABEL_NAME.fullmatch(name):
        return f"label key {key!r} must be [prefix/]name with the name {LABEL_HELP}"
    return None


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a DNS host name (None when it is one)."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    parts = host.split(".")
    if (0 < len(host) <= 253 and all(HOST_PART.fullmatch(p) for p in parts)
            and not parts[-1].isdigit()):
        return None
    hint = suggest(host, r"A-Za-z0-9.-")
    return (f"must be a host name (dot-separated labels of letters, digits and '-') or an IP "
            f"address (got {host!r})" + (f"; e.g. {hint}" if hint else ""))


def dns_label_problem(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes DNS-1123 label (namespace names)."""
    if DNS_LABEL.fullmatch(value):
        return None
    hint = suggest(value.lower(), r"a-z0-9-")
    return (f"must be a Kubernetes name: at most 63 lowercase letters, digits and '-', starting "
            f"and ending with a letter or digit (got {value!r})"
            + (f"; e.g. {hint}" if hint else ""))


def host_port_problem(address: str) -> str | None:
    """Why ``HOST[:PORT]`` (an IPv6 host in brackets) is not an address (None when it is)."""
    host, port = address, None
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return f"must be HOST[:PORT] (got {address!r})"
            port = rest[1:]
    elif address.count(":") == 1:
        host, port = address.split(":")
    why = host_problem(host)
    if why:
        return why
    if port is not None and not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
        return f"has a port that is not a number 1-65535 (got {address!r})"
    return None
