"""The study folder ``runs/<study>/``: the frozen config and its hash, the storage, caches, trials.

Running the same command again resumes. A config that changed on resume is refused with the list
of what changed — except the fields that are safe to change (trial count, time limit, failure limit,
step budget), which update the frozen copy. Nothing is written before the new config is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from compsearch._files import write_text_atomic
from compsearch.errors import ConfigError, StorageError
from compsearch.search.config import SAFE_TO_CHANGE, StudyConfig, config_digest, diff, parse_config

CONFIG, DIGEST = "config.yaml", "config.sha256"


@dataclass
class StudyFolder:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def exists(self) -> bool:
        return self.config_path.exists()

    def frozen(self) -> StudyConfig:
        if not self.exists():
            raise StorageError(
                f"expected a study folder with {CONFIG} at {str(self.path)!r}, but there is none. "
                "Start the study with 'compsearch search CONFIG' first."
            )
        data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        return parse_config(data, source=str(self.config_path))

    def check_resume(self, config: StudyConfig) -> list[tuple[str, object, object]]:
        """The safe changes a resume would make; ConfigError (with the diff) for unsafe ones."""
        if not self.exists():
            return []
        old = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        changes = diff(old, config.raw)
        unsafe = [c for c in changes if c[0] not in SAFE_TO_CHANGE]
        if unsafe:
            changed = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in unsafe)
            raise ConfigError(
                f"study {config.study!r} exists at {str(self.path)!r} with a different config "
                f"({changed}); resuming would mix trials of two searches. Restore the config, "
                "or give the new search another study name (only the search budgets, limits and "
                "Ray settings may change on resume)."
            )
        return changes

    def freeze(self, config: StudyConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config.raw, sort_keys=False)
        write_text_atomic(self.config_path, text)
        write_text_atomic(self.path / DIGEST, config_digest(config.raw) + "\n")


def folder_for(config: StudyConfig, root: Path) -> StudyFolder:
    return StudyFolder(root / config.study)
