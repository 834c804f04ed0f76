"""docs/real_scale.md's crop statistics (scripts/crop_stats.py): the page's table is the one its JSON renders, the JSON
holds what the script measures (re-drawn here with fewer crops, within sampling error), and the figures mean what
the page says: the format-1 store never reaches outside the centre square, format 2 crops as timm does where it
stores the photo as it is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crop_stats():
    spec = importlib.util.spec_from_file_location("crop_stats", REPO / "scripts" / "crop_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pages_table_is_the_jsons(crop_stats):
    result = json.loads(crop_stats.OUT.read_text())
    from scripts.docs import blocks

    table = dict(blocks(crop_stats.PAGE.read_text()))["crop_stats"].strip()
    assert table == crop_stats.render(result)
    assert result["short_sides"] == list(crop_stats.SHORT_SIDES) and result["crops_per_image"] == 20_000


def test_the_json_holds_what_the_script_measures(crop_stats):
    result = json.loads(crop_stats.OUT.read_text())
    for row in result["shapes"][:2]:  # 500x375, 375x500: fewer crops, the same figures within sampling error
        again = crop_stats.measure([tuple(row["size"])], 3000, seed=1)
        for name, figures in row["figures"].items():
            for key in ("upscaled", "outside_centre_square"):
                assert abs(again[name][key] - figures[key]) < 0.03, (row["size"], name, key)
            assert again[name]["magnification"] == pytest.approx(figures["magnification"], rel=0.03)


def test_the_figures_mean_what_the_page_says(crop_stats):
    small = crop_stats.measure([(300, 225)], 4000)  # stored as it is at every short side measured
    big = crop_stats.measure([(500, 375)], 4000)
    for figures in (small, big):
        assert figures["store_v1"]["outside_centre_square"] == 0.0  # the square is all it has
        assert figures["store_v1"]["magnification"] > 1.05 * figures["timm"]["magnification"]
        for s in crop_stats.SHORT_SIDES:
            f = figures[f"store_{s}"]
            assert abs(f["outside_centre_square"] - figures["timm"]["outside_centre_square"]) < 0.03
            assert f["magnification"] == pytest.approx(figures["timm"]["magnification"], rel=0.03)  # 4000 crops
    for s in crop_stats.SHORT_SIDES:  # the photo itself: timm's upscaled share
        assert abs(small[f"store_{s}"]["upscaled"] - small["timm"]["upscaled"]) < 0.03
    ups = [big[f"store_{s}"]["upscaled"] for s in crop_stats.SHORT_SIDES]
    assert ups == sorted(ups, reverse=True) and ups[-1] > big["timm"]["upscaled"]  # more pixels, fewer upscaled
