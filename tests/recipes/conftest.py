import os

import pytest

from slimtrain.recipes.shakespeare import shakespeare_files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first 20 kB of three plays, one file each (so the split is by play, as on the full corpus)."""
    d = tmp_path_factory.mktemp("corpus")
    paths = []
    for src in shakespeare_files()[:3]:
        with open(src) as f:
            (d / os.path.basename(src)).write_text(f.read()[:20_000])
        paths.append(str(d / os.path.basename(src)))
    return paths
