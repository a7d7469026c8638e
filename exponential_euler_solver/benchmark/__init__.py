"""The benchmark command and its parts, one module each: :mod:`.cli` (arguments, output), :mod:`.suite` (running
the grid), :mod:`.problem` (data subset, network, loss), :mod:`.results`, :mod:`.report` (tables, JSON, plot),
:mod:`.grid_checkpoint`, :mod:`.peer` (stable-solvers in our step protocol), :mod:`.datasets` (digits, photos,
CIFAR-10), :mod:`.networks` (``--net``), :mod:`.criteria` (``--loss``), :mod:`.work_precision` (``--work-precision``),
:mod:`.scaling` (cost growth with data and width, ``euler-scaling``) and :mod:`.memory` (the memory probe)."""
