//! Fleet rollouts (`twinfleet_models::rollout`): start one, list them with their
//! progress per wave, and pause, resume or cancel one.

use super::{Caller, Errors, Result};
use actix_web::{HttpResponse, get, post, web};
use serde::Serialize;
use twinfleet_actors::TwinRuntime;
use twinfleet_models::Action;
use twinfleet_models::rollout::{Control, Rollout, RolloutSpec, WaveProgress};

pub(super) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list_rollouts).service(start_rollout).service(show_rollout).service(control_rollout);
}

/// A rollout with its progress per wave.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RolloutView {
    #[serde(flatten)]
    rollout: Rollout,
    progress: Vec<WaveProgress>,
}

fn view(rollout: Rollout) -> RolloutView {
    RolloutView { progress: rollout.progress(), rollout }
}

/// `GET /rollouts`: every rollout with its progress per wave.
#[utoipa::path(tag = "rollouts", responses((status = 200, body = Vec<RolloutView>), Errors), security(("bearer" = [])))]
#[get("/rollouts")]
async fn list_rollouts(rt: web::Data<TwinRuntime>, caller: Caller) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Read)?;
    Ok(HttpResponse::Ok().json(rt.rollouts()?.into_iter().map(view).collect::<Vec<_>>()))
}

/// `POST /rollouts`: starts a rollout of an app version to a device type's twins
/// (`groups`: only the members of these DTAs), in `waves` of cumulative percentages,
/// at most `rate.per_minute` installs a minute (times `rate.growth` each minute),
/// aborting once more than `abort.failure_rate` of at least `abort.min_count` ended
/// installs failed (`on_abort`: `roll_back` or `postpone`), each wave held by the
/// `health_gate` (`min_severity`, `hold`) before the next. A second rollout of the same
/// app on any of the same twins is refused (409). Needs `manage`.
#[utoipa::path(tag = "rollouts", request_body = RolloutSpec, responses((status = 201, body = RolloutView), Errors), security(("bearer" = [])))]
#[post("/rollouts")]
async fn start_rollout(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    body: web::Json<RolloutSpec>,
) -> Result<HttpResponse> {
    let spec = body.into_inner();
    rt.authorize(&caller.0, Action::Manage)?;
    Ok(HttpResponse::Created().json(view(rt.start_rollout(spec).await?)))
}

/// `GET /rollouts/{id}`: one rollout, every target's status and the progress per wave.
#[utoipa::path(tag = "rollouts", responses((status = 200, body = RolloutView), Errors), security(("bearer" = [])))]
#[get("/rollouts/{id}")]
async fn show_rollout(rt: web::Data<TwinRuntime>, caller: Caller, id: web::Path<String>) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Read)?;
    Ok(HttpResponse::Ok().json(view(rt.rollout(&id)?)))
}

/// `POST /rollouts/{id}/{action}`: `pause`, `resume` or `cancel` (installs already sent
/// run to their end). A rollout that cannot take it (ended, not paused) answers 409.
#[utoipa::path(tag = "rollouts", responses((status = 200, body = RolloutView), Errors), security(("bearer" = [])))]
#[post("/rollouts/{id}/{action}")]
async fn control_rollout(
    rt: web::Data<TwinRuntime>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse> {
    rt.authorize(&caller.0, Action::Manage)?;
    let (id, action) = path.into_inner();
    let c = match action.as_str() {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "cancel" => Control::Cancel,
        other => {
            return Err(twinfleet_actors::TwinError::Invalid(format!(
                "{other:?} is not a rollout action: pause, resume or cancel"
            ))
            .into());
        }
    };
    Ok(HttpResponse::Ok().json(view(rt.control_rollout(&id, c).await?)))
}
