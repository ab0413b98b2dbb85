"""Models and decoders: RTA-Former T/S/M/L and its decoder (RTA-Former sec. II, Table I)."""

from ..models.rta_former import SIZES, RTAFormer, RTAFormerDecoder
from ..registry import hookimpl


@hookimpl
def register_components(register):
    for size, (backbone, depth) in SIZES.items():
        register(f"rta-former-{size}", RTAFormer, backbone=backbone, hfs_depth=depth)
    register("rta-former-decoder", RTAFormerDecoder)
