"""Registry lookups the flows make for the stages (a stage package never reads another's: the import contracts):
the champion's adapter for `finetune.init_adapter: champion`."""
from __future__ import annotations

from workspace.config import LoadedConfig


def resolve_init_adapter(loaded: LoadedConfig) -> LoadedConfig:
    """`finetune.init_adapter: champion` -> the champion's adapter folder, fetched once into the cache (the run key
    then follows the adapter's bytes). Any other value is returned as it is."""
    ft = loaded.config.finetune
    if ft.init_adapter != "champion":
        return loaded
    from finetune.train import FinetuneError
    from serving.registry import champion_info, fetch_version_cached
    from workspace.tracking import configure

    configure(loaded)
    name = loaded.config.tracking.registered_model
    champ = champion_info(name)
    if champ is None:
        raise FinetuneError(f"finetune.init_adapter is 'champion' (set in {loaded.origin('finetune.init_adapter')}) but "
                            f"{name} has no champion yet: promote one first, or unset it")
    adapter = fetch_version_cached(name, champ["version"]) / "adapter"
    print(f"[finetune] starting from the champion's adapter: {name} v{champ['version']} ({adapter})")
    return loaded.with_values(f"finetune.init_adapter: champion = v{champ['version']}",
                              {"finetune.init_adapter": str(adapter)})
