"""Model listing and administration: load (the newest version, or pin one: a rollback), unload."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends

from slsg_gateway.api.deps import GatewayState, get_state, require_admin_key, require_models_key
from slsg_gateway.backends.base import ServedModel
from slsg_gateway.schemas import ErrorResponse, LoadRequest, ModelList, ModelVersionInfo

router = APIRouter(prefix="/v1/models", tags=["models"])
_ADMIN_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 422, 503)}


def model_info(model: ServedModel, desired_version: int | None = None) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=model.name, versions=list(model.versions), served_version=model.served_version,
        pinned_version=model.pinned_version, desired_version=desired_version, ready=model.ready,
        input_height=model.input_height, input_width=model.input_width,
        max_batch_size=model.max_batch_size or None, card=model.card_dict())


@router.get("", response_model=ModelList, dependencies=[Depends(require_models_key)],
            responses={code: {"model": ErrorResponse} for code in (401, 403, 503)},
            summary="List models (an inspection key once keys are configured)")
async def list_models(state: GatewayState = Depends(get_state)) -> ModelList:
    models = await state.backend.list_models()
    desired = state.reconciler.desired_version
    return ModelList(backend=state.backend.name, models=[model_info(m, desired(m.name)) for m in models])


@router.post("/{name}/load", response_model=ModelVersionInfo, responses=_ADMIN_ERRORS,
             dependencies=[Depends(require_admin_key)], summary="Serve the newest version, or pin one (rollback)")
async def load_model(name: str, body: LoadRequest | None = Body(default=None),
                     state: GatewayState = Depends(get_state)) -> ModelVersionInfo:
    """Without a body: (re)load and serve the newest version, ending any pin. With ``{"version": N}``:
    serve version N until the next load without a version. On failure the served version stays. A model
    with a serving.json returns to its desired version at the gateway's next reconcile pass."""
    model = await state.backend.load(name, body.version if body else None)
    state.metrics.set_served_version(name, model.served_version)
    return model_info(model, state.reconciler.desired_version(name))


@router.post("/{name}/unload", response_model=ModelVersionInfo, responses=_ADMIN_ERRORS,
             dependencies=[Depends(require_admin_key)], summary="Stop serving a model")
async def unload_model(name: str, state: GatewayState = Depends(get_state)) -> ModelVersionInfo:
    await state.backend.unload(name)
    state.metrics.set_served_version(name, None)
    listed = {m.name: m for m in await state.backend.list_models()}
    return model_info(listed.get(name, ServedModel(name, (), None, False)), state.reconciler.desired_version(name))
