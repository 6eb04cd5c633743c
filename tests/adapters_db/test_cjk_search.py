"""Names written without spaces (Chinese, Japanese) are found by a part of them, on both backends."""

from __future__ import annotations

import adapters_db
from adapters_db.catalog import Catalog
from tests.adapters_db.conftest import civitai_record


def test_part_of_a_cjk_name_finds_it(catalog: Catalog) -> None:
    records = [
        civitai_record(
            801,
            "FilmGirl 胶片风",
            tags=["photography"],
            description="film look portraits",
            file_name="fg.safetensors",
        ),
        civitai_record(
            802, "ShojoVibe少女感", tags=["style"], description="soft anime style", file_name="sv.safetensors"
        ),
        civitai_record(803, "Plain Watercolor", tags=["style"], description="watercolor painting"),
        civitai_record(804, "Neon City", tags=["scenery"], description="cyberpunk streets at night"),
    ]
    with catalog.session() as s:
        summary = adapters_db.import_civitai_records(s, catalog, ((str(r["id"]), r) for r in records))
        assert summary.count("imported") == len(records)
    with catalog.session() as s:
        for query, name in (
            ("胶片", "FilmGirl 胶片风"),
            ("少女", "ShojoVibe少女感"),
            ("胶片风 portrait", "FilmGirl 胶片风"),
        ):
            hits = adapters_db.search(s, catalog, query, k=4)
            assert hits[0].adapter.name == name, (query, [h.adapter.name for h in hits])
            assert hits[0].channels["m_name"] > 0 and "name:" in hits[0].why
    with catalog.session() as s:
        for text, names in (
            ("胶片", ["FilmGirl 胶片风"]),
            ("少女感", ["ShojoVibe少女感"]),
            ("胶片 film", ["FilmGirl 胶片风"]),
        ):
            page = adapters_db.list_adapters(s, catalog, text=text)
            assert [a.name for a in page.items] == names, text
        assert adapters_db.list_adapters(s, catalog, text="少女 watercolor").items == ()
