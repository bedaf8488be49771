"""The study folder ``runs/<study>/``: the frozen config and its hash, the storage, caches, trials.

Running the same command again resumes. A config that changed on resume is refused with the list
of what changed — except the fields that are safe to change (trial count, time limit, failure limit,
step budget), which update the frozen copy. Nothing is written before the new config is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from compsearch._files import write_text_atomic
from compsearch.errors import ConfigError, StorageError
from compsearch.search.config import SAFE_TO_CHANGE, StudyConfig, config_digest, diff, parse_config
from compsearch.search.samplers import make_sampler
from compsearch.search.storage import open_storage

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


def open_study(
    config: StudyConfig, folder: StudyFolder, directions: list[str] | None = None
) -> optuna.Study:
    """The study in its storage: for reading (``directions`` None; it must exist), or created or
    resumed with the config's sampler (``directions`` given; they must match what is stored)."""
    storage = open_storage(config.search.storage, folder.path)
    if directions is None:
        return optuna.load_study(study_name=config.study, storage=storage)
    study = optuna.create_study(
        study_name=config.study,
        storage=storage,
        directions=directions,
        sampler=make_sampler(config),
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(
            f"study {config.study!r}: the storage holds it with directions {stored}, but the config "
            f"gives {directions}. Use another study name."
        )
    return study


def recipe_study(recipe, root: Path) -> StudyConfig | None:
    """The frozen config of the study a recipe came from, where that study is under ``root``."""
    study = recipe.provenance.study
    if not study or "/" in study or study.startswith("."):
        return None
    folder = StudyFolder(root / study)
    return folder.frozen() if folder.exists() else None
