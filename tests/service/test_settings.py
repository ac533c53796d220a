"""Service settings from WSI_MIL_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from wsi_mil.service.settings import ServiceSettings


def test_environment_is_read_with_the_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WSI_MIL_MODELS_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("WSI_MIL_API_KEY", "zq-secret-9")
    monkeypatch.setenv("WSI_MIL_MAX_UPLOAD_MB", "12.5")
    monkeypatch.setenv("WSI_MIL_WORKERS", "3")
    monkeypatch.setenv("WSI_MIL_CORS_ORIGINS", '["https://a.org", "https://b.org"]')
    monkeypatch.setenv("WSI_MIL_SLIDE_ROOT", "")
    settings = ServiceSettings()
    assert settings.models_dir == tmp_path / "m" and settings.workers == 3
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "zq-secret-9"
    assert "zq-secret-9" not in repr(settings)
    assert settings.max_upload_bytes == int(12.5 * 2**20)
    assert settings.cors_origins == ["https://a.org", "https://b.org"]
    assert settings.slide_root is None
    assert ServiceSettings(workers=1).workers == 1  # explicit values win over the environment


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_MIL_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        ServiceSettings()
    monkeypatch.delenv("WSI_MIL_PORT")
    with pytest.raises(ValidationError, match="workers"):
        ServiceSettings(workers=-1)
