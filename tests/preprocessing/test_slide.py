"""SlideReader, open_slide, resolve_mpp, quick_hash and describe_slide on every real test slide."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from wsi_mil.errors import MissingMppError, SlideOpenError
from wsi_mil.preprocessing.slide import (
    MppInfo,
    SlideReader,
    describe_slide,
    open_slide,
    quick_hash,
    resolve_mpp,
)

CMU = "tissue/CMU-1-Small-Region.svs"
TCGA = "tissue/tcga-cr-7395-01a-01-ts1.svs"
NDPI = "tissue/test3-DAPI-2-(387).ndpi"
CMU_DICOM = "tissue/dicom-cmu-1-small-region"


def test_cmu_svs_reads_with_its_own_mpp(slides_dir: Path) -> None:
    with open_slide(slides_dir / CMU) as slide:
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == MppInfo(0.499, "properties")
        assert slide.best_level_for_downsample(16.0) == 0
        region = slide.read_region((1000, 1500), 0, (300, 200))
    assert region.shape == (200, 300, 3)
    assert region.dtype == np.uint8
    assert region.std() > 10  # real tissue, not a blank read


def test_tcga_without_mpp_needs_an_override(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / TCGA)
    with pytest.raises(MissingMppError, match=r"manifest column `mpp` or pass `--slide-mpp`"):
        _ = slide.mpp
    with_override = open_slide(slides_dir / TCGA, mpp_override=0.25)
    assert with_override.mpp == MppInfo(0.25, "override")
    assert with_override.mpp_override == 0.25
    assert with_override.level_dimensions == ((4443, 3567), (2221, 1783))
    # 2.0005 counts as the 2x level (1 % tolerance), so reads at 2x do not fall back to level 0.
    assert with_override.best_level_for_downsample(2.0) == 1
    assert with_override.best_level_for_downsample(1.9) == 0


def test_override_that_disagrees_with_the_slide_is_ignored_with_a_warning(
    slides_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wsi_mil.preprocessing.slide"):
        info = open_slide(slides_dir / CMU, mpp_override=0.3).mpp
    assert info == MppInfo(0.499, "properties")
    assert "0.3" in caplog.text and "0.499" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsi_mil.preprocessing.slide"):
        assert open_slide(slides_dir / CMU, mpp_override=0.51).mpp.mpp == 0.499
    assert caplog.text == ""


def test_ndpi_fluorescence_facts(slides_dir: Path) -> None:
    info = describe_slide(slides_dir / NDPI)
    assert info.vendor == "hamamatsu"
    assert len(info.level_dimensions) == 7
    assert info.level_dimensions[0] == (3968, 4864)
    assert info.level_downsamples == (1, 2, 4, 8, 16, 32, 64)
    assert info.mpp == pytest.approx(0.22818, abs=1e-5)
    assert info.mpp_source == "properties"
    assert info.objective_power == 40
    assert info.associated_images == ("macro",)


@pytest.mark.parametrize("file_name", ["level-0-frames-0-30.dcm", "level-11-frames-0-1.dcm"])
def test_dicom_series_opens_from_any_file(slides_dir: Path, file_name: str) -> None:
    with open_slide(slides_dir / CMU_DICOM / file_name) as slide:
        assert slide.vendor == "dicom"
        assert slide.level_count == 12
        assert slide.dimensions == (2220, 2967)
        assert slide.level_dimensions[-1] == (1, 1)
        assert slide.mpp == MppInfo(0.499, "properties")
        assert slide.read_level(6).shape == (46, 34, 3)


def test_dicom_whose_header_mislabels_ycbcr_frames_reads_in_the_svs_colours(slides_dir: Path) -> None:
    svs = open_slide(slides_dir / CMU)
    dicom = open_slide(slides_dir / CMU_DICOM / "level-0-frames-0-30.dcm")
    assert dicom.properties["dicom.PhotometricInterpretation"] == "RGB"  # what OpenSlide trusts
    assert dicom.color_correction is not None and "YCbCr" in dicom.color_correction
    region = ((500, 1500), 0, (800, 800))
    wanted = svs.read_region(*region).astype(float)
    got = dicom.read_region(*region).astype(float)
    # The same section through two JPEG encodings: under 8 levels apart on average, same means.
    assert np.abs(got - wanted).mean() < 8
    np.testing.assert_allclose(got.mean(axis=(0, 1)), wanted.mean(axis=(0, 1)), atol=3)
    # The glass outside the slide is padded white, not salmon (255, 128, 128).
    assert (dicom.read_region((2200, 2900), 0, (64, 64))[-8:, -8:] == 255).all()
    raw = openslide.OpenSlide(slides_dir / CMU_DICOM / "level-0-frames-0-30.dcm")
    uncorrected = np.asarray(raw.read_region((0, 0), 0, (64, 64)).convert("RGB"), dtype=float)
    assert uncorrected[..., 0].mean() - uncorrected[..., 1].mean() > 60  # OpenSlide alone: salmon
    # A DICOM whose JPEG frames say RGB (Adobe transform 0) is left alone.
    assert open_slide(slides_dir / "tiny/dicom-boxes/boxes_0.dcm").color_correction is None


def test_tiny_svs_and_its_dicom_conversion_have_identical_pixels(slides_dir: Path) -> None:
    svs = open_slide(slides_dir / "tiny/small.svs")
    assert (svs.dimensions, svs.mpp) == ((16, 16), MppInfo(0.499, "properties"))
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        dicom = open_slide(slides_dir / "tiny/dicom-boxes" / name)
        assert dicom.vendor == "dicom"
        assert dicom.dimensions == (16, 16)
    volume = open_slide(slides_dir / "tiny/dicom-boxes/boxes_0.dcm")
    np.testing.assert_array_equal(volume.read_level(0), svs.read_level(0))


def test_generic_tiff_mpp_is_recorded_as_coming_from_the_resolution_tags(
    slides_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slide = open_slide(slides_dir / "tiny/boxes.tiff")
    properties = slide.properties
    # OpenSlide turns XResolution=28.35 px/cm into openslide.mpp-x itself; the value (a 72-dpi
    # placeholder, 352.8 µm/px) is the tag's, and so is the source recorded.
    assert properties["tiff.ResolutionUnit"] == "centimeter"
    assert properties["openslide.vendor"] == "generic-tiff"
    assert slide.mpp.source == "tiff_resolution"
    assert slide.mpp.mpp == pytest.approx(1e4 / float(properties["tiff.XResolution"]))
    assert slide.level_count == 4
    # Such a placeholder is implausible for a scan, so an override wins over it, with a warning.
    with caplog.at_level(logging.WARNING, logger="wsi_mil.preprocessing.slide"):
        overridden = open_slide(slides_dir / "tiny/boxes.tiff", mpp_override=0.5).mpp
    assert overridden == MppInfo(0.5, "override")
    assert "implausible" in caplog.text


def test_mpp_from_tiff_resolution_when_openslide_reports_none(aperio_without_mpp: Path) -> None:
    slide = open_slide(aperio_without_mpp)
    assert slide.vendor == "aperio"
    assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
    assert slide.mpp == MppInfo(0.25, "tiff_resolution")


@pytest.mark.parametrize(
    ("properties", "override", "expected"),
    [
        ({"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"}, None, MppInfo(0.5, "properties")),
        (
            {"openslide.mpp-x": "0.5", "openslide.vendor": "generic-tiff"},
            None,
            MppInfo(0.5, "tiff_resolution"),
        ),
        (
            {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
            None,
            MppInfo(0.25, "tiff_resolution"),
        ),
        (
            {"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"},
            None,
            MppInfo(0.5, "tiff_resolution"),
        ),
        (
            {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "none"},
            0.3,
            MppInfo(0.3, "override"),
        ),
        (
            {
                "openslide.mpp-x": "0.25",
                "tiff.XResolution": "20000",
                "tiff.ResolutionUnit": "centimeter",
            },
            0.5,
            MppInfo(0.25, "properties"),
        ),
        ({}, 0.75, MppInfo(0.75, "override")),
    ],
)
def test_resolve_mpp_order(
    properties: dict[str, str], override: float | None, expected: MppInfo
) -> None:
    assert resolve_mpp(properties, override=override) == expected


@pytest.mark.parametrize("override", [None, 0.0, -1.0, float("nan")])
def test_resolve_mpp_without_a_usable_value_names_the_fix(override: float | None) -> None:
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        resolve_mpp({"openslide.mpp-x": "garbage"}, override=override, slide_name="x.svs")


@pytest.mark.parametrize(
    ("file_name", "reason"),
    [
        ("unopenable.tiff", "Unsupported TIFF compression: 52479"),
        ("unreadable.svs", "corrupt image data: Bogus marker length"),
        ("broken.svs", "not a whole-slide image format OpenSlide supports"),
        ("kidney-48-5.tif", "not a whole-slide image format OpenSlide supports"),
        ("small_dicom.dcm", "Couldn't get image flavor"),
        ("does-not-exist.svs", "file not found"),
    ],
)
def test_broken_files_raise_slide_open_error_with_a_reason(
    slides_dir: Path, file_name: str, reason: str
) -> None:
    with pytest.raises(SlideOpenError) as caught:
        open_slide(slides_dir / "broken" / file_name)
    message = str(caught.value)
    assert message.startswith(f"{file_name}: ")
    assert reason in message


def test_empty_and_truncated_files_say_so_and_suggest_copying_again(
    slides_dir: Path, synthetic_slide, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    cmu = (slides_dir / CMU).read_bytes()
    half_svs = tmp_path / "half.svs"
    half_svs.write_bytes(cmu[: len(cmu) // 2])
    built = synthetic_slide.path.read_bytes()
    short_tiff = tmp_path / "short.tiff"  # the directories survive, the last tiles do not
    short_tiff.write_bytes(built[:-5000])
    expected = {
        empty: "empty file (0 bytes); copy it again",
        half_svs: f"truncated or corrupt (file ends at byte {len(cmu) // 2}); copy it again",
        short_tiff: f"truncated or corrupt (file ends at byte {len(built) - 5000}; its tiles run to byte",
    }
    for path, phrase in expected.items():
        with pytest.raises(SlideOpenError) as caught:
            open_slide(path)
        message = str(caught.value)
        assert message.startswith(f"{path.name}: cannot open: ") and phrase in message, message
        assert "not a whole-slide image format" not in message
        assert "\n" not in message


def test_a_truncated_file_of_a_dicom_series_is_named_when_its_frames_fail(
    slides_dir: Path, tmp_path: Path
) -> None:
    series = tmp_path / "series"
    shutil.copytree(slides_dir / CMU_DICOM, series)
    level0 = series / "level-0-frames-0-30.dcm"
    size = level0.stat().st_size // 2
    level0.write_bytes(level0.read_bytes()[:size])
    slide = open_slide(series / "level-3-frames-0-1.dcm")  # the small levels are whole
    with pytest.raises(SlideOpenError) as caught:
        slide.read_region((0, 0), 0, (512, 512))
    assert str(caught.value).endswith(
        f"level-0-frames-0-30.dcm of the series: truncated or corrupt (file ends at byte {size} "
        "inside its compressed frames); copy it again"
    )


def test_unreadable_svs_fails_on_read_and_recovers_from_sticky_errors(slides_dir: Path) -> None:
    slide = SlideReader(slides_dir / "broken/unreadable.svs")
    assert slide.dimensions == (16, 16)  # opening works; the JPEG data is corrupt
    for _ in range(2):
        with pytest.raises(SlideOpenError, match="Bogus marker length"):
            slide.read_region((0, 0), 0, (16, 16))
        # OpenSlide's error is sticky; the reader reopened, so metadata still answers.
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert slide.mpp.mpp == 0.499
    with pytest.raises(SlideOpenError, match="Bogus marker length"):
        slide.get_thumbnail((8, 8))


def test_readers_sharing_a_tile_cache_read_the_same_pixels_and_keep_it_after_reopening(slides_dir: Path) -> None:
    cache = openslide.OpenSlideCache(8 * 2**20)
    plain, first, second = (SlideReader(slides_dir / CMU) for _ in range(3))
    first.read_region((0, 0), 0, (8, 8))  # open before sharing: the open handle takes the cache
    first.share_cache(cache)
    second.share_cache(cache)  # not open yet: the handle takes it when it opens
    region = ((1000, 700), 0, (300, 300))  # across stored tiles (240 px) in both directions
    expected = plain.read_region(*region)
    np.testing.assert_array_equal(first.read_region(*region), expected)
    np.testing.assert_array_equal(second.read_region(*region), expected)
    first.close()  # reopened on next use, with the shared cache again
    np.testing.assert_array_equal(first.read_region(*region), expected)
    assert first._handle is not None and second._handle is not None


def test_out_of_bounds_reads_are_white_and_thumbnails_fit(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / CMU)
    corner = slide.read_region((2200, 2950), 0, (64, 64))
    assert (corner[17:, 20:] == 255).all()
    thumbnail = slide.get_thumbnail((200, 200))
    assert thumbnail.mode == "RGB"
    assert thumbnail.size == (150, 200)


def test_read_resampled_matches_the_pyramid_level(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.path)
    level3 = slide.read_level(3).astype(np.float64)
    resampled = slide.read_resampled((512, 384)).astype(np.float64)
    assert resampled.shape == level3.shape
    assert np.abs(resampled - level3).mean() < 2.0
    # A sub-region at a lower size comes from the same place as a direct level read.
    crop = slide.read_resampled((64, 64), region=(1024.0, 512.0, 512.0, 512.0)).astype(np.float64)
    direct = np.asarray(
        Image.fromarray(slide.read_region((1024, 512), 1, (256, 256))).resize((64, 64), Image.BOX)
    )
    assert np.abs(crop - direct).mean() < 2.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_reader_pickles_and_reads_in_a_child_process(slides_dir: Path, start_method: str) -> None:
    reader = open_slide(slides_dir / CMU)
    expected = reader.read_region((900, 1400), 0, (32, 32))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.path == reader.path and "closed" in repr(clone)
    context = multiprocessing.get_context(start_method)
    # Callables from the package, not this module: spawn children cannot import test modules.
    with context.Pool(1) as pool:
        child_repr = pool.apply(repr, (reader,))
        pixels = pool.apply(SlideReader.read_region, (reader, (900, 1400), 0, (32, 32)))
    assert "closed" in child_repr  # the handle did not travel; the child opened its own
    np.testing.assert_array_equal(pixels, expected)


def test_close_and_context_manager_release_the_handle(slides_dir: Path) -> None:
    reader = SlideReader(slides_dir / CMU, mpp_override=0.5)
    assert "closed" in repr(reader)
    with reader:
        reader.read_region((0, 0), 0, (1, 1))
        assert "open" in repr(reader) and "mpp_override=0.5" in repr(reader)
    assert "closed" in repr(reader)
    assert reader.read_region((0, 0), 0, (1, 1)).shape == (1, 1, 3)  # reopens on use


def test_quick_hash_covers_size_head_and_tail(tmp_path: Path) -> None:
    payload = bytearray(np.random.default_rng(1).integers(0, 256, 3 * 2**20, dtype=np.uint8))
    original = tmp_path / "a.bin"
    original.write_bytes(payload)
    digest = quick_hash(original)
    assert len(digest) == 64 and digest == quick_hash(original)
    middle, tail = bytearray(payload), bytearray(payload)
    middle[len(payload) // 2] ^= 0xFF
    tail[-1] ^= 0xFF
    (tmp_path / "middle.bin").write_bytes(middle)
    (tmp_path / "tail.bin").write_bytes(tail)
    assert quick_hash(tmp_path / "middle.bin") == digest  # by design: only head and tail
    assert quick_hash(tmp_path / "tail.bin") != digest
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert quick_hash(small) == hashlib.sha256(b"3abc").hexdigest()
    with pytest.raises(SlideOpenError, match=r"missing\.bin"):
        quick_hash(tmp_path / "missing.bin")


def test_describe_slide_reports_missing_mpp_as_none(slides_dir: Path) -> None:
    info = describe_slide(slides_dir / TCGA)
    assert (info.vendor, info.mpp, info.mpp_source, info.objective_power) == (
        "aperio",
        None,
        None,
        None,
    )
    assert info.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)
    assert info.associated_images == ("thumbnail",)
    assert json.loads(json.dumps(info.to_dict()))["dimensions"] == [4443, 3567]
    cmu = describe_slide(slides_dir / CMU)
    assert cmu.associated_images == ("label", "macro", "thumbnail")
    assert (cmu.mpp, cmu.objective_power) == (0.499, 20)
