"""``foveal list``, ``foveal info NAME``, ``foveal plugins``."""

from __future__ import annotations

import json

from ..core.component import KINDS


def add_commands(sub) -> None:
    p = sub.add_parser("list", help="list registered components")
    p.add_argument("--kind", choices=KINDS, help="only components of this kind")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="show a component's documentation and config fields")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the full info (with JSON schema) as JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("plugins", help="list loaded plugins, their components and load errors")
    p.set_defaults(func=cmd_plugins)


def cmd_list(args) -> int:
    from .. import registry

    rows = [(n, registry.entry(n).kind, registry.entry(n).plugin) for n in registry.names(args.kind)]
    width = max((len(n) for n, _, _ in rows), default=4)
    for name, kind, plugin in rows:
        print(f"{name:<{width}}  {kind:<9}  {plugin}")
    return 0


def cmd_info(args) -> int:
    from .. import registry

    info = registry.info(args.name)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['name']}  ({info['kind']}, {info['class']})")
    print(f"plugin: {info['plugin']} [{info['distribution']} {info['version']}]")
    if info["aliases"]:
        print(f"aliases: {', '.join(info['aliases'])}")
    if info["doc"]:
        print()
        print(info["doc"])
    print("\nconfig:")
    for name, f in info["fields"].items():
        default = "(required)" if f["required"] else f"= {f['default']!r}"
        print(f"  {name}: {f['type']} {default}")
        if f["description"]:
            print(f"      {f['description']}")
    return 0


def cmd_plugins(args) -> int:
    from .. import registry

    for p in registry.list_plugins():
        status = f"FAILED: {p.error}" if p.error else f"{len(p.components)} components"
        print(f"{p.name}  [{p.distribution or 'local'} {p.version}]  {status}")
        if p.components:
            print("    " + ", ".join(p.components))
    return 0
