"""Energy where it is spent: the network on a DNN accelerator, through ZigZag (``pip install maxdnn[accelerator]``).

ZigZag (KU Leuven's DNN-accelerator design-space exploration engine, the
``zigzag-dse`` package) maps every multiplying layer of the integer graph onto
an accelerator description (hardware YAML and mapping YAML) and returns per
layer its MAC energy (the operational array's ``unit_energy`` times the
layer's MAC count) and the energy of every memory level. maxdnn builds the
workload from the graph itself (layer shapes, strides, padding, groups;
8-bit operands, 16-bit partial sums as the shipped templates hold them), runs
ZigZag once per (graph shapes, accelerator) and caches the result.

An assignment changes only the MAC energy (ZigZag's memory energy does not
depend on it), so the correction per layer is exact: the layer's MAC energy
is ZigZag's exact MAC energy times the layer's relative energy under the
assignment, which is its processing-element energy (multiplier + 24-bit
accumulator) relative to the exact PE where the energy table has PE
energies, else its multiplication energy relative to the exact multiplier
(``energy_per_layer``; the MAC of ZigZag's operational unit is a multiply and
accumulate). An all-exact assignment reproduces ZigZag's own numbers to the
pJ. Only multiplying layers are counted (additions, pooling and requantization
are outside the MAC array).

Accelerators: the name of one of ZigZag's own templates (``tpu_like``,
``edge_tpu_like``, ``eyeriss_like``, ... as installed with ``zigzag-dse``;
``TEMPLATES`` lists the ones tested here) or ``HW.yaml:MAPPING.yaml``, a
user's ZigZag hardware and mapping file. The mapping's spatial unrolling is
clipped per layer to the layer's own dimensions (a 3-channel stem layer
cannot fill 32 columns), and a layer the array would hold whole keeps one
temporal loop (ZigZag needs one: its largest spatial unrolling is halved or
cut to the next divisor).

Example::

    from maxdnn.accelerator import accelerator_energy
    r = accelerator_energy(graph, assignment, "tpu_like")
    r["total"]["gain"], r["total"]["mac_share_exact"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from maxdnn.atomic import write_json
from maxdnn.data import cache_dir
from maxdnn.errors import MaxdnnError
from maxdnn.ir.graph import multiplication_counts

TEMPLATES = ("tpu_like", "edge_tpu_like")  # ZigZag templates the tests run; any installed one works
OPERAND_BITS = {"W": 8, "I": 8, "O": 16, "O_final": 8}


class AcceleratorError(MaxdnnError, ValueError):
    """A bad, unknown or unmappable accelerator description, as one line."""


def _zigzag():
    try:
        import zigzag
    except ImportError:
        raise AcceleratorError("accelerator energy needs ZigZag: pip install 'maxdnn[accelerator]' "
                               "(zigzag-dse and six)") from None
    return zigzag


def resolve(accelerator: str) -> tuple[Path, Path, str]:
    """(hardware YAML, mapping YAML, name) of a template name or ``HW.yaml:MAPPING.yaml``."""
    if accelerator.endswith((".yaml", ".yml")) or ":" in accelerator:
        hw, sep, mapping = accelerator.partition(":")
        if not sep:
            raise AcceleratorError(f"{accelerator}: give the hardware and the mapping file as HW.yaml:MAPPING.yaml")
        hw_p, map_p = Path(hw), Path(mapping)
        for p in (hw_p, map_p):
            if not p.is_file():
                raise AcceleratorError(f"{p}: no such file")
        return hw_p, map_p, hw_p.stem
    base = Path(_zigzag().__file__).parent / "inputs"
    hw_p, map_p = base / "hardware" / f"{accelerator}.yaml", base / "mapping" / f"{accelerator}.yaml"
    if not hw_p.is_file() or not map_p.is_file():
        known = sorted(p.stem for p in (base / "hardware").glob("*.yaml") if (base / "mapping" / p.name).is_file())
        raise AcceleratorError(f"accelerator {accelerator!r}: not a ZigZag template (known: {', '.join(known)}) "
                               "nor HW.yaml:MAPPING.yaml")
    return hw_p, map_p, accelerator


def _read_yaml(path: Path, what: str):
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise AcceleratorError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return doc


def workload(q) -> list[dict]:
    """ZigZag's layer list for the multiplying layers of graph ``q``, in graph order."""
    out = []
    for i, (name, layer) in enumerate(q.layers.items()):
        f, cg, kh, kw = layer.weight.shape
        g = layer.groups
        (ho, wo), s = layer.out_hw, layer.stride
        left, right, top, bottom = layer.pads
        out.append({
            "id": i, "name": name, "operator_type": "Conv",
            "equation": "O[b][g][k][oy][ox]+=W[g][k][c][fy][fx]*I[b][g][c][iy][ix]",
            "dimension_relations": [f"ix={s}*ox+1*fx", f"iy={s}*oy+1*fy"],
            "loop_dims": ["B", "G", "K", "C", "OY", "OX", "FY", "FX"],
            "loop_sizes": [1, g, f // g, cg, ho, wo, kh, kw],
            "pr_loop_dims": ["IX", "IY"], "pr_loop_sizes": [(wo - 1) * s + kw, (ho - 1) * s + kh],
            "padding": [[left, right], [top, bottom]],
            "operand_precision": dict(OPERAND_BITS),
            "operand_source": {"I": i - 1} if i else {},
        })
    return out


def _mapping_for(layers: list[dict], mapping_doc, sizes: dict[str, int], path: Path) -> list[dict]:
    """Per layer, the mapping's default entry with its spatial unrolling clipped to the layer's dimensions."""
    if not isinstance(mapping_doc, list) or not mapping_doc:
        raise AcceleratorError(f"{path}: not a ZigZag mapping (a list of entries with spatial_mapping)")
    default = next((m for m in mapping_doc if isinstance(m, dict) and m.get("name") == "default"), mapping_doc[0])
    if not isinstance(default, dict) or "spatial_mapping" not in default:
        raise AcceleratorError(f"{path}: its default entry has no spatial_mapping")
    out = []
    for lay in layers:
        dims = dict(zip(lay["loop_dims"], lay["loop_sizes"]))
        spatial = {}
        for array_dim, unrolls in default["spatial_mapping"].items():
            spatial[array_dim] = []
            for u in unrolls:
                d, n = (t.strip() for t in str(u).split(","))
                size = max(1, min(int(n), dims.get(d, 1), sizes.get(array_dim, int(n))))
                while dims.get(d, 1) % size:  # a divisor of the layer's dimension
                    size -= 1
                spatial[array_dim].append(f"{d}, {size}")
        unrolled = {u.split(",")[0]: int(u.split(",")[1]) for us in spatial.values() for u in us}
        if all(dims[d] == unrolled.get(d, 1) for d in dims if dims[d] > 1):  # the array holds the layer whole:
            for array_dim in reversed(list(spatial)):  # keep one temporal loop, which ZigZag needs
                d, n = spatial[array_dim][-1].split(", ")
                smaller = [k for k in range(int(n) - 1, 0, -1) if dims[d] % k == 0]
                if smaller:
                    spatial[array_dim][-1] = f"{d}, {smaller[0]}"
                    break
        out.append({**{k: v for k, v in default.items() if k != "name"}, "name": lay["name"],
                    "spatial_mapping": spatial})
    return out + [{**default, "name": "default"}]  # ZigZag wants a default entry


def _level_name(entry: str) -> str:
    m = re.search(r"instance=([^,)]+)", entry)
    return m[1] if m else entry


def zigzag_layers(q, accelerator: str) -> dict:
    """ZigZag's per-layer result for graph ``q`` on ``accelerator`` (cached per graph shapes and accelerator
    files): {"accelerator", "unit_energy_pj", "layers": {name: {"macs", "mac_pj", "memory_pj": {level: pJ},
    "total_pj"}}}."""
    hw_p, map_p, name = resolve(accelerator)
    hw_doc = _read_yaml(hw_p, "ZigZag hardware description")
    if not isinstance(hw_doc, dict) or "operational_array" not in hw_doc or "memories" not in hw_doc:
        raise AcceleratorError(f"{hw_p}: not a ZigZag hardware description (needs memories and operational_array)")
    oa = hw_doc["operational_array"]
    try:
        unit = float(oa["unit_energy"])
        sizes = dict(zip(oa["dimensions"], (int(v) for v in oa["sizes"])))
    except (KeyError, TypeError, ValueError):
        raise AcceleratorError(f"{hw_p}: operational_array needs unit_energy, dimensions and sizes") from None
    layers = workload(q)
    mapping = _mapping_for(layers, _read_yaml(map_p, "ZigZag mapping"), sizes, map_p)
    key = hashlib.sha256(json.dumps([layers, mapping], sort_keys=True).encode() + hw_p.read_bytes()).hexdigest()[:20]
    path = cache_dir() / "hardware" / f"zigzag-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    _zigzag()
    import yaml
    from zigzag.api import get_hardware_performance_zigzag

    with tempfile.TemporaryDirectory(prefix="maxdnn-zigzag-") as tmp:
        mp = Path(tmp) / "mapping.yaml"
        mp.write_text(yaml.safe_dump(mapping))
        level = logging.root.manager.disable
        logging.disable(logging.CRITICAL)  # ZigZag logs every mapping it tries
        try:
            get_hardware_performance_zigzag(layers, str(hw_p), str(mp), opt="energy", dump_folder=tmp,
                                            loma_show_progress_bar=False)
        except Exception as e:  # ZigZag's own errors: a description it cannot map this network onto
            raise AcceleratorError(f"{hw_p}: ZigZag cannot map this network onto it "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        finally:
            logging.disable(level)
        res = {"accelerator": name, "hardware": str(hw_p), "mapping": str(map_p), "unit_energy_pj": unit,
               "layers": {}}
        for lay in layers:
            doc = json.loads((Path(tmp) / f"{lay['name']}_complete.json").read_text())
            e = doc["outputs"]["energy"]
            links = mapping[0].get("memory_operand_links", {})
            levels = doc["inputs"]["accelerator"]["mem_hierarchy_dict"]
            memory: dict[str, float] = {}
            for op, per_level in e["memory_energy_breakdown_per_level"].items():
                names = levels.get(links.get(op, op), [])
                for k, v in enumerate(per_level):
                    lvl = _level_name(names[k]) if k < len(names) else f"{op} level {k}"
                    memory[lvl] = memory.get(lvl, 0.0) + float(v)
            res["layers"][lay["name"]] = {"macs": int(np.prod(lay["loop_sizes"])), "mac_pj": float(e["operational_energy"]),
                                          "memory_pj": memory, "total_pj": float(e["energy_total"])}
    write_json(path, res)
    return res


def energy_per_layer(q, assignment, table) -> dict[str, float]:
    """Per layer, its MAC energy under ``assignment`` relative to all-exact: PE energies where the table has
    them, else multiplication energies (module docstring)."""
    a = assignment.bind(q)
    counts = multiplication_counts(q)
    out = {}
    for name, amap in a.maps.items():
        if table.pe is not None:
            rel = np.array([table.pe[s] for s in a.specs])
        else:
            rel = np.array([table.for_layer(name, s) / table.for_layer(name, "exact") for s in a.specs])
        out[name] = float(rel[amap].sum() * counts[name]) / float(amap.size * counts[name]) if amap.size else 1.0
    return out


class AcceleratorModel:
    """The accelerator energy of graph ``q`` on ``accelerator`` for any assignment: ZigZag's mapping search
    runs (or is read from the cache) once, at construction; each ``energy(assignment)`` then costs a sum over
    the layers (microseconds), which is what lets an exploration take the accelerator energy as its objective
    (``explore --energy accelerator:NAME``). ``table``: the energy table of the relative MAC energies
    (default: maxdnn's hardware table for each assignment's specs).

    Example::

        chip = AcceleratorModel(graph, "tpu_like")
        chip.energy(assignment)["total"]["gain"]
    """

    def __init__(self, q, accelerator: str = "tpu_like", table=None):
        self.q, self.table = q, table
        self.zz = zigzag_layers(q, accelerator)
        self.name = self.zz["accelerator"]

    def energy(self, assignment) -> dict:
        """``accelerator_energy`` of ``assignment`` (same keys)."""
        from maxdnn.energy import energy_table

        a = assignment.bind(self.q)
        table = self.table or energy_table(a.specs, a.bits)
        zz = self.zz
        rel = energy_per_layer(self.q, a, table)
        layers, tot = {}, {"mac_exact_pj": 0.0, "mac_pj": 0.0, "memory_pj": {}}
        for name, z in zz["layers"].items():
            mac = z["mac_pj"] * rel[name]
            layers[name] = {"macs": z["macs"], "mac_exact_pj": z["mac_pj"], "mac_pj": mac,
                            "memory_pj": z["memory_pj"], "total_exact_pj": z["total_pj"],
                            "total_pj": z["total_pj"] - z["mac_pj"] + mac}
            tot["mac_exact_pj"] += z["mac_pj"]
            tot["mac_pj"] += mac
            for lvl, v in z["memory_pj"].items():
                tot["memory_pj"][lvl] = tot["memory_pj"].get(lvl, 0.0) + v
        mem = sum(tot["memory_pj"].values())
        tot["total_exact_pj"], tot["total_pj"] = tot["mac_exact_pj"] + mem, tot["mac_pj"] + mem
        tot["gain"] = 1.0 - tot["total_pj"] / tot["total_exact_pj"]
        tot["mac_share_exact"] = tot["mac_exact_pj"] / tot["total_exact_pj"]
        return {"accelerator": zz["accelerator"], "unit": "pJ per image",
                "source": f"ZigZag ({zz['accelerator']}: {zz['hardware']}); MAC energy scaled per layer by the "
                          f"{'PE' if table.pe is not None else 'multiplication'} energy of the assignment "
                          f"({table.source}), unit_energy {zz['unit_energy_pj']:g} pJ as the exact MAC",
                "layers": layers, "total": tot}


def accelerator_energy(q, assignment, accelerator: str = "tpu_like", table=None) -> dict:
    """The network's energy per image on ``accelerator`` (a ZigZag template name or ``HW.yaml:MAPPING.yaml``),
    exact and under ``assignment``: per layer and in total, MAC energy, each memory level's and the sum, in pJ
    per image, with the gain and the MAC share of the exact network (module docstring). ``table``: the energy
    table of the relative MAC energies (default: maxdnn's hardware table). ZigZag's mapping search runs once
    per (graph shapes, accelerator) and is cached: later calls, any assignment, take milliseconds
    (``AcceleratorModel`` skips even the cache lookup).

    Example::

        r = maxdnn.accelerator_energy(graph, maxdnn.layer_assignment(graph, {n: "roup-p2r2" for n in graph.layers}))
        print(f"{100 * r['total']['gain']:.2f}% of {r['total']['total_exact_pj']:.3g} pJ per image; "
              f"MACs are {100 * r['total']['mac_share_exact']:.1f}% of it")
    """
    return AcceleratorModel(q, accelerator, table).energy(assignment)
