"""Compression passes: one module per pass, registered by decorator; imported explicitly here."""
from . import cleanup  # noqa: F401
from . import fold_bn  # noqa: F401
from . import quant, codebook  # noqa: F401
from . import prune, slim  # noqa: F401
from . import blockperm  # noqa: F401
from . import lowrank  # noqa: F401
from . import goal_tables  # noqa: F401  (the hook "goal-tables": --goal's sensitivity tables)
