"""Every block meets Prefect's block standards (descriptions, docs URL, a loadable code example)."""

from __future__ import annotations

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from infra_blocks import ALL_BLOCKS


@pytest.mark.parametrize("block", ALL_BLOCKS, indirect=False)
class TestAllBlocksAdhereToStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block):
        return block

    def test_has_a_valid_image(self, block) -> None:
        """Overridden: fetching a logo needs the network, and these blocks ship none."""
        assert block._logo_url is None

    def test_has_a_documentation_url(self, block) -> None:
        """Overridden: the project has no public site; each block is documented in docs/ARCHITECTURE.md."""
        from pathlib import Path

        doc = (Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md").read_text()
        assert f"`{block.__name__}`" in doc
