import json

from services.planner.catalog import BUILTIN_GPUS, GpuSpec, builtin_catalog


def test_catalog_covers_ten_accelerators_from_four_vendors() -> None:
    assert len(BUILTIN_GPUS) >= 10
    assert {g.vendor for g in BUILTIN_GPUS} >= {"nvidia", "amd", "huawei", "intel"}
    assert len(builtin_catalog()) == len(BUILTIN_GPUS)  # names are unique


def test_every_figure_has_a_source_and_a_dense_flag() -> None:
    for gpu in BUILTIN_GPUS:
        assert gpu.source.strip(), gpu.name
        assert gpu.dense is True, f"{gpu.name}: built-in figures are dense"


def test_known_datasheet_figures() -> None:
    catalog = builtin_catalog()
    assert (catalog["h100-sxm"].tflops_bf16, catalog["h100-sxm"].hbm_gbps) == (989, 3350)
    assert (catalog["mi300x"].memory_gb, catalog["mi300x"].hbm_gbps) == (192, 5300)
    assert catalog["a100-80gb"].tflops_bf16 == 312


def test_a_sparse_figure_is_halved() -> None:
    sparse = builtin_catalog()["h100-sxm"].model_copy(update={"tflops_bf16": 1979, "dense": False})
    assert sparse.dense_flops == 989.5e12


def test_gpus_json_lists_required_fields(run_cli) -> None:
    code, out, _ = run_cli("gpus", "--json")
    assert code == 0
    entries = json.loads(out)
    assert len(entries) >= 10
    for entry in entries:
        assert {"name", "vendor", "tflops_bf16", "hbm_gbps", "memory_gb", "source", "dense"} <= set(
            entry
        )
        GpuSpec.model_validate(entry)


def test_gpus_table_names_every_type(run_cli) -> None:
    code, out, _ = run_cli("gpus")
    assert code == 0
    for gpu in BUILTIN_GPUS:
        assert gpu.name in out
