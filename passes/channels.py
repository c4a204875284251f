"""Transitional: the names other modules import from the former `channels.py`, now in the modules that own them
(`coupling.py`, `channel_space.py`, `cutting.py`, `channel_plan.py`, `graph_util.py`). Removed once every importer
names the owning module."""
from .channel_plan import note_unprunable, plan_removal, round_keep, summarize_plan  # noqa: F401
from .channel_space import Group, Layout, Member, Segment, Slot, sub_layout  # noqa: F401
from .coupling import RULES, channel_groups, describe, merged_axis  # noqa: F401
from .cutting import CUTTERS, Cut, apply_plan, expand, remove_channels, tensor_masks  # noqa: F401
from .graph_util import (constant_shape, constant_value, infer_shapes, node_labels, set_constant_input,  # noqa: F401
                         topological_order, weight_shape, weight_value)
