"""tools/mosaic_sass.py: the overlap report read off a SASS listing (the compile itself needs the
CUDA plugin's wheel and runs by hand: docs/benchmarks.md, session 21)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

PATH = pathlib.Path(__file__).parents[2] / "tools" / "mosaic_sass.py"
spec = importlib.util.spec_from_file_location("mosaic_sass", PATH)
mosaic_sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mosaic_sass)

SASS = """
        Function : entry_mosaic_gpu_kernel
        /*0100*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88, gsb0 ;  /* 0x0 */
        /*0110*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;                                     /* 0x0 */
        /*0120*/                   FMNMX.NAN R153, R24, R28, !PT ;                                     /* 0x0 */
        /*0130*/                   MUFU.EX2 R24, R24 ;                                                 /* 0x0 */
        /*0140*/                   MUFU.EX2 R25, R25 ;                                                 /* 0x0 */
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                                     /* 0x0 */
        /*0160*/                   MUFU.EX2 R26, R26 ;                                                 /* 0x0 */
        /*0170*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;                                     /* 0x0 */
        /*0180*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                                     /* 0x0 */
"""


def test_overlap_report_counts_what_runs_before_the_wait_for_all_groups():
    assert mosaic_sass.overlap_report(SASS) == [
        "wait for 1 group at /*0110*/: 3 instructions, 2 exp2 before the wait for all",
        "wait for 1 group at /*0170*/: 0 instructions, 0 exp2 before the wait for all",
    ]


@pytest.mark.parametrize("module, error", [
    ("pasts=x.py", "--module KIND must be one of gate, work, past, finish, got pasts"),
    ("past", "--module takes KIND=FILE, got past"),
    ("past=no/such/file.py", "--module FILE not found: no/such/file.py"),
])  # fmt: skip
def test_a_bad_module_is_named(capsys, module, error):
    with pytest.raises(SystemExit):
        mosaic_sass.main(["--out", "unused", "--module", module])
    assert error in capsys.readouterr().err
