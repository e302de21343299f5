"""Finding a role by name: the four built-in roles, or any module that follows the role contract.

Built-in names map to packages imported lazily, so `quartet serve reward` only imports the reward
service (and a missing or broken role does not stop the others from being served). Any other name
containing a dot is imported as a module: that is how a custom role is served, e.g.

    quartet serve my_package.my_role --set options.threshold=0.5

The module must expose `NAME`, `Options` (a pydantic model) and `create(ctx, options) -> Role`
(see services/common/role.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from services.common.role import Role, RoleContext
from services.common.settings import ConfigError, validate

BUILTIN_ROLES: dict[str, str] = {
    "generator": "services.generator",
    "reward": "services.reward",
    "reference": "services.reference",
    "value": "services.value",
}

#: Proto service name of each built-in role (health service names; `quartet status` uses them).
ROLE_SERVICES: dict[str, str] = {
    "generator": "quartet.v1.Generator",
    "reward": "quartet.v1.Reward",
    "reference": "quartet.v1.Reference",
    "value": "quartet.v1.Value",
}


@dataclass(frozen=True)
class RoleSpec:
    """A role module, checked to follow the contract."""

    name: str            # NAME as declared by the module
    module: ModuleType
    options_model: type[BaseModel]

    def parse_options(self, options: dict[str, Any] | BaseModel | None) -> BaseModel:
        """Validate `options`; errors name the field as `options.<field>`."""
        if isinstance(options, self.options_model):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump()
        return validate(self.options_model, options or {}, prefix="options")

    def create(self, ctx: RoleContext, options: BaseModel) -> Role:
        return self.module.create(ctx, options)


def resolve_role(name: str) -> RoleSpec:
    """The RoleSpec for a built-in role name or a dotted module path; ConfigError if neither."""
    module_name = BUILTIN_ROLES.get(name)
    if module_name is None:
        if "." not in name:
            raise ConfigError(
                f"role: unknown role {name!r}; use one of {', '.join(BUILTIN_ROLES)} "
                "or the dotted module path of a custom role (exposing NAME, Options, create)"
            )
        module_name = name
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"role: module {module_name!r} for role {name!r} cannot be found") from None
        raise
    missing = [attr for attr in ("NAME", "Options", "create") if not hasattr(module, attr)]
    if missing:
        raise ConfigError(f"role: module {module_name!r} lacks {', '.join(missing)} (see services/common/role.py)")
    options_model = module.Options
    if not (isinstance(options_model, type) and issubclass(options_model, BaseModel)):
        raise ConfigError(f"role: {module_name}.Options must be a pydantic model class")
    return RoleSpec(name=str(module.NAME), module=module, options_model=options_model)
