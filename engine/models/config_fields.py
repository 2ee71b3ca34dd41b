"""Reading the fields a family's checks need from a model's component configs (``ModelFamily.check_configs``).

A field that is missing or of the wrong type is kept as a :class:`~engine.stages.ConfigProblem` naming it, so
that a family collects everything wrong with a model and the user sees it at once, by config field.
"""

from __future__ import annotations

from typing import Any

from engine.stages import ConfigProblem, Configs

_REQUIRED = object()


class ConfigFields:
    """The fields read so far and the problems found with them."""

    def __init__(self, configs: Configs):
        self.configs = configs
        self.problems: list[ConfigProblem] = []

    def get(self, folder: str, key: str, kind: type | tuple[type, ...], *, absent: Any = _REQUIRED) -> Any:
        """``key`` of ``folder``'s config when it is a ``kind`` (``absent`` when the key is missing and
        ``absent`` is given); otherwise None, and a problem is kept."""
        config = self.configs.get(folder, {})
        if key not in config:
            if absent is _REQUIRED:
                self.refuse(folder, key, "missing")
                return None
            return absent
        value = config[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            self.refuse(folder, key, f"expected {names}, got {value!r}")
            return None
        return value

    def refuse(self, folder: str, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(folder, key, message))
