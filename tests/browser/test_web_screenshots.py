"""The scenario that makes docs/web/*.png runs from the current code."""

from tests.browser.screenshots import NAMES, take_screenshots


def test_docs_screenshots_can_be_regenerated(chromium, region, tmp_path):
    shots = take_screenshots(chromium, region, tmp_path)
    assert [p.name for p in shots] == NAMES
    for path in shots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
