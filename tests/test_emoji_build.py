"""The bundled emoji set's captions: CLDR short names ("red heart"), as the build script writes them."""

import importlib.util
import json
from pathlib import Path

from datasets import Dataset

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("build_emoji_dataset", ROOT / "assets/tools/build_emoji_dataset.py")
build = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(build)


def test_caption_uses_the_cldr_name_and_matches_with_or_without_fe0f(tmp_path):
    names = tmp_path / "data.json"
    names.write_text(json.dumps([{"label": "red heart", "hexcode": "2764"},
                                 {"label": "flag: Germany", "hexcode": "1F1E9-1F1EA"}]), encoding="utf-8")
    cldr = build.read_cldr_names(names)
    heart = {"unified": "2764-FE0F", "name": "HEAVY BLACK HEART", "category": "Smileys & Emotion",
             "subcategory": "heart"}
    flag = {"unified": "1F1E9-1F1EA", "name": "Germany Flag", "category": "Flags", "subcategory": "country-flag"}
    unnamed = {"unified": "1F600", "name": "GRINNING FACE", "category": "Smileys & Emotion",
               "subcategory": "face-smiling"}
    assert build.caption_for(heart, cldr) == "red heart, smileys & emotion, heart"
    assert build.caption_for(flag, cldr) == "flag: germany, flags, country-flag"
    assert build.caption_for(unnamed, cldr) == "grinning face, smileys & emotion, face-smiling"
    assert build.caption_for(heart) == "heavy black heart, smileys & emotion, heart"


def test_bundled_set_names_the_hearts_by_colour():
    texts = Dataset.from_parquet(str(ROOT / "assets/emoji/emoji.parquet"))["text"]
    assert len(texts) == 1911
    assert "red heart, smileys & emotion, heart" in texts
    assert not any(t.startswith("heavy black heart") for t in texts)
    colours = {t.split(" heart,")[0] for t in texts if t.endswith(", heart") and " heart," in t}
    assert {"red", "yellow", "blue", "green", "purple", "black"} <= colours
