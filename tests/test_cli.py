"""The command-line entry points' error reporting: a user error is one line naming what is wrong,
also when it is raised in a DataLoader worker process."""
import pytest
from torch.utils.data import DataLoader, Dataset

from vitpe.cli import run_cli
from vitpe.errors import DataError


class _BadImage(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise DataError(f"cannot decode image /data/train/{i:05d}.jpg: image file is truncated")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_error_names_the_file_also_from_a_worker(workers, capsys):
    def main(argv):
        for _ in DataLoader(_BadImage(), num_workers=workers):
            pass

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, [])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: cannot decode image /data/train/00000.jpg: image file is truncated"
