"""segment_anything's modeling classes are used without its torchvision-importing package __init__, and the
package still behaves normally for other code in the process."""
import json
import subprocess
import sys
import textwrap

from RobustMedSAMLib.modeling.sam_package import defer_package_init

_PROBE = textwrap.dedent("""
    import json, sys
    from RobustMedSAMLib.models import seeded_model
    loaded = seeded_model("tiny")
    before = "torchvision" in sys.modules
    from segment_anything import SamPredictor, sam_model_registry  # runs the deferred __init__ now
    import segment_anything
    from segment_anything.modeling import MaskDecoder
    print(json.dumps({
        "torchvision_before": before,
        "torchvision_after": "torchvision" in sys.modules,
        "same_classes": isinstance(loaded.model.mask_decoder, MaskDecoder)
                        and segment_anything.modeling.MaskDecoder is MaskDecoder,
        "registry": sorted(sam_model_registry),
        "predictor": SamPredictor.__module__,
        "missing": hasattr(segment_anything, "no_such_name"),
    }))
""")


def test_engine_does_not_import_torchvision_and_package_still_works():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["torchvision_before"] is False
    assert res["torchvision_after"] is True  # the package's own __init__ ran on first use
    assert res["same_classes"] is True
    assert res["registry"] == ["default", "vit_b", "vit_h", "vit_l"]
    assert res["predictor"] == "segment_anything.predictor"
    assert res["missing"] is False


def test_nothing_to_do_when_imported_already_or_missing():
    assert "segment_anything" in sys.modules  # this test process imported the engine
    assert defer_package_init() is False
    assert defer_package_init("no_such_package_robustmedsam") is False
    assert "no_such_package_robustmedsam" not in sys.modules
