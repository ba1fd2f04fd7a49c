"""Collect-all validation helpers: every problem is recorded with its path and a hint."""
from __future__ import annotations

import difflib
import re
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable

from ..errors import Problem

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class Checker:
    """Accumulates problems; never raises, so one run reports everything."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def error(self, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(path, message, hint))

    # -- shapes -------------------------------------------------------------
    def mapping(self, value: Any, path: str, required: bool = False) -> dict:
        """Return ``value`` if it is a mapping; record a problem otherwise."""
        if value is None:
            if required:
                self.error(path, "is required")
            return {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_kind(value)}")
            return {}
        return value

    def sequence(self, value: Any, path: str, required: bool = False) -> list:
        if value is None:
            if required:
                self.error(path, "is required")
            return []
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {_kind(value)}")
            return []
        return value

    def fields(self, obj: dict, path: str, known: Iterable[str], ignored: Iterable[str] = ()) -> None:
        """Flag keys that are neither known nor deliberately ignored, suggesting the closest."""
        known = set(known)
        allowed = known | set(ignored)
        for key in obj:
            if key in allowed:
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(sorted(known))}"
            self.error(_join(path, str(key)), "unknown field", hint)

    # -- scalars ------------------------------------------------------------
    def integer(self, value: Any, path: str, lo: int | None = None, hi: int | None = None,
                hint: str = "") -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, got {value!r}", hint)
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo}–{hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
            self.error(path, f"must be {rng}, got {value}", hint)
            return None
        return value

    def port(self, value: Any, path: str) -> int | None:
        return self.integer(value, path, 1, 65535)

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {value!r}")
            return None
        return value

    def string(self, value: Any, path: str, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.error(path, "is required")
            return None
        if not isinstance(value, str) or not value:
            self.error(path, f"must be a non-empty string, got {value!r}")
            return None
        return value

    def choice(self, value: Any, path: str, choices: Iterable[str], default: str) -> str:
        choices = tuple(choices)
        if value is None:
            return default
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean '{close[0]}'?" if close else ""
            self.error(path, f"must be one of {', '.join(choices)}; got {value!r}", hint)
            return default
        return value

    def dns_label(self, value: Any, path: str, max_len: int = 63, why: str = "",
                  rfc1035: bool = False) -> str | None:
        name = self.string(value, path, required=True)
        if name is None:
            return None
        pattern = DNS1035_LABEL if rfc1035 else DNS1123_LABEL
        if not pattern.match(name):
            first = "a lowercase letter" if rfc1035 else "a lowercase letter or digit"
            self.error(path, f"{name!r} is not a valid DNS-{'1035' if rfc1035 else '1123'} label",
                       f"use lowercase letters, digits and '-', starting with {first}")
            return None
        if len(name) > max_len:
            self.error(path, f"{name!r} is {len(name)} characters, at most {max_len} allowed{why}",
                       "choose a shorter name")
            return None
        return name

    def port_name(self, value: Any, path: str) -> str | None:
        name = self.string(value, path)
        if name is None:
            return None
        if len(name) > 15 or not IANA_SVC_NAME.match(name) or "--" in name or not re.search("[a-z]", name):
            self.error(path, f"{name!r} is not a valid port name (IANA_SVC_NAME)",
                       "at most 15 lowercase letters, digits and '-', with at least one letter")
            return None
        return name

    def labels(self, value: Any, path: str) -> dict[str, str]:
        labels = self.mapping(value, path)
        out: dict[str, str] = {}
        for key, val in labels.items():
            if val is None:
                val = ""
            if not isinstance(key, str) or not LABEL_KEY.match(key):
                self.error(_join(path, str(key)), "invalid label key", "use [prefix/]name with alphanumerics, '-', '_', '.'")
                continue
            if not isinstance(val, (str, int, float)) or isinstance(val, bool) or not LABEL_VALUE.match(str(val)) or len(str(val)) > 63:
                self.error(_join(path, key), f"invalid label value {val!r}", "quote it as a string of up to 63 alphanumerics, '-', '_', '.'")
                continue
            out[key] = str(val)
        return out

    def network(self, value: Any, path: str) -> IPv4Network | None:
        if not isinstance(value, str):
            self.error(path, f"must be an IPv4 CIDR such as 10.0.0.0/16, got {value!r}")
            return None
        try:
            return IPv4Network(value)
        except ValueError as exc:
            hint = ""
            try:
                hint = f"did you mean {IPv4Network(value, strict=False)}?"
            except ValueError:
                hint = "write it as a.b.c.d/len"
            self.error(path, f"{value!r} is not a valid IPv4 CIDR ({exc})", hint)
            return None

    def address(self, value: Any, path: str) -> IPv4Address | None:
        if not isinstance(value, str):
            self.error(path, f"must be an IPv4 address, got {value!r}")
            return None
        try:
            return IPv4Address(value)
        except ValueError:
            self.error(path, f"{value!r} is not a valid IPv4 address")
            return None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and not path.endswith(": ") else f"{path}{key}"


def join(path: str, key: str) -> str:
    """``join('spec', 'ports')`` → ``spec.ports``; also handles a bare object prefix."""
    return _join(path, key)
