//! Who may do what: roles, grants and the decision, after the authorization service of
//! Maree et al. (section 4.3.2). Pure: the caller supplies the facts (the twin's type,
//! which DTAs it belongs to) and gets a decision.
//!
//! Two questions are asked of every request:
//! 1. does the caller's **role** allow this kind of action at all ([`Role::allows`]);
//! 2. does one of the caller's **groups** hold a grant covering the object, with enough
//!    access ([`Scope`], [`Access`]). Admins skip the second question.
//!
//! A grant covers a twin directly, every twin of a device type (its TDTA), every member
//! of a DTA and of the DTAs nested under it, or the whole fleet.

use crate::ids::{DeviceTypeId, DtaId, IdError, TwinId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A user's role: what kinds of action they may take at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Everything, on every twin, plus users, groups, grants and the audit log.
    Admin,
    /// Platform configurators: device types, DTAs and their layers, creating and
    /// deleting twins, plus everything a maintainer does; within their grants.
    Configurator,
    /// Maintainers: read and write twins, their metadata and device tokens, archive
    /// them, inspect the actors; within their grants.
    Maintainer,
    /// Device owners: read their twins, write desired state and components.
    Owner,
}

/// The kinds of action the API distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Read a twin (state, telemetry, components, events).
    Read,
    /// Change what a twin should be: desired state, components.
    Write,
    /// Change what a twin is: metadata, device token, archive.
    Manage,
    /// Create and delete twins.
    Provision,
    /// Create and change device types and DTAs (layers, membership).
    Configure,
    /// Inspect the platform: actors, alerts, jobs of others.
    Inspect,
    /// Users, groups, grants, audit log.
    Administer,
}

impl Role {
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => true,
            Role::Configurator => !matches!(action, Administer),
            Role::Maintainer => matches!(action, Read | Write | Manage | Inspect),
            Role::Owner => matches!(action, Read | Write),
        }
    }

    /// The access a grant must give for `action` on the object.
    pub fn needs(action: Action) -> Access {
        match action {
            Action::Read | Action::Inspect => Access::Read,
            _ => Access::Write,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Configurator => "configurator",
            Role::Maintainer => "maintainer",
            Role::Owner => "owner",
        })
    }
}

/// How much a grant gives. `Write` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Access {
    Read,
    Write,
}

/// What a grant covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Scope {
    /// Every twin, device type and DTA.
    Fleet,
    Twin(TwinId),
    /// Every twin of this device type (its TDTA).
    DeviceType(DeviceTypeId),
    /// Every member of this DTA and of the DTAs nested under it.
    Dta(DtaId),
}

/// A group's right on a scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Grant {
    pub scope: Scope,
    pub access: Access,
}

/// The name of a user or a group: the same rules as every other identifier.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), IdError> {
    // Borrow the id rules (non-empty, ≤ 128 bytes, [A-Za-z0-9._:-]).
    TwinId::new(name).map(|_| ()).map_err(|e| match e {
        IdError::Empty { .. } => IdError::Empty { kind },
        IdError::TooLong { id, max, .. } => IdError::TooLong { kind, id, max },
        IdError::BadChar { id, ch, .. } => IdError::BadChar { kind, id, ch },
    })
}

/// What is known of a twin when deciding on it.
pub trait TwinFacts {
    fn id(&self) -> &TwinId;
    fn device_type(&self) -> &DeviceTypeId;
    /// Whether the twin is a member of `dta` or of a DTA nested under it.
    fn within(&self, dta: &DtaId) -> bool;
}

/// The highest access `grants` give on the twin, if any.
pub fn access_to_twin<'a>(grants: impl IntoIterator<Item = &'a Grant>, twin: &impl TwinFacts) -> Option<Access> {
    grants
        .into_iter()
        .filter(|g| match &g.scope {
            Scope::Fleet => true,
            Scope::Twin(id) => id == twin.id(),
            Scope::DeviceType(t) => t == twin.device_type(),
            Scope::Dta(d) => twin.within(d),
        })
        .map(|g| g.access)
        .max()
}

/// The highest access `grants` give on a DTA, given whether `d` is it or one of its
/// ancestors (`encloses(d)`).
pub fn access_to_dta<'a>(
    grants: impl IntoIterator<Item = &'a Grant>,
    encloses: impl Fn(&DtaId) -> bool,
) -> Option<Access> {
    grants
        .into_iter()
        .filter(|g| match &g.scope {
            Scope::Fleet => true,
            Scope::Dta(d) => encloses(d),
            _ => false,
        })
        .map(|g| g.access)
        .max()
}

/// The highest access `grants` give on a device type.
pub fn access_to_type<'a>(grants: impl IntoIterator<Item = &'a Grant>, ty: &DeviceTypeId) -> Option<Access> {
    grants
        .into_iter()
        .filter(|g| match &g.scope {
            Scope::Fleet => true,
            Scope::DeviceType(t) => t == ty,
            _ => false,
        })
        .map(|g| g.access)
        .max()
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("role {role} may not {action:?}")]
    Role { role: Role, action: Action },
    #[error("no grant gives {needed:?} access to {object}")]
    NoGrant { needed: Access, object: String },
}

/// The full decision: role first, then grants (admins skip the grants).
pub fn decide(role: Role, action: Action, granted: Option<Access>, object: &str) -> Result<(), Denied> {
    if !role.allows(action) {
        return Err(Denied::Role { role, action });
    }
    if role == Role::Admin {
        return Ok(());
    }
    let needed = Role::needs(action);
    match granted {
        Some(a) if a >= needed => Ok(()),
        _ => Err(Denied::NoGrant { needed, object: object.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T {
        id: TwinId,
        ty: DeviceTypeId,
        dtas: Vec<DtaId>,
    }

    impl TwinFacts for T {
        fn id(&self) -> &TwinId {
            &self.id
        }
        fn device_type(&self) -> &DeviceTypeId {
            &self.ty
        }
        fn within(&self, dta: &DtaId) -> bool {
            self.dtas.contains(dta)
        }
    }

    fn twin(id: &str, ty: &str, dtas: &[&str]) -> T {
        T { id: id.parse().unwrap(), ty: ty.parse().unwrap(), dtas: dtas.iter().map(|d| d.parse().unwrap()).collect() }
    }

    fn g(scope: Scope, access: Access) -> Grant {
        Grant { scope, access }
    }

    #[test]
    fn grants_cover_twins_directly_by_type_by_dta_and_fleet() {
        let t = twin("a", "pump", &["ward-1"]);
        let direct = [g(Scope::Twin("a".parse().unwrap()), Access::Read)];
        let by_type = [g(Scope::DeviceType("pump".parse().unwrap()), Access::Write)];
        let by_dta = [g(Scope::Dta("ward-1".parse().unwrap()), Access::Read)];
        let other =
            [g(Scope::Twin("b".parse().unwrap()), Access::Write), g(Scope::Dta("x".parse().unwrap()), Access::Write)];
        assert_eq!(access_to_twin(&direct, &t), Some(Access::Read));
        assert_eq!(access_to_twin(&by_type, &t), Some(Access::Write));
        assert_eq!(access_to_twin(&by_dta, &t), Some(Access::Read));
        assert_eq!(access_to_twin(&other, &t), None);
        assert_eq!(access_to_twin(&[g(Scope::Fleet, Access::Read)], &t), Some(Access::Read));
        // The highest wins.
        let both = [direct[0].clone(), by_type[0].clone()];
        assert_eq!(access_to_twin(&both, &t), Some(Access::Write));
    }

    #[test]
    fn roles_bound_actions_and_grants_bound_objects() {
        assert_eq!(decide(Role::Owner, Action::Write, Some(Access::Write), "a"), Ok(()));
        assert!(matches!(decide(Role::Owner, Action::Manage, Some(Access::Write), "a"), Err(Denied::Role { .. })));
        assert!(matches!(
            decide(Role::Maintainer, Action::Write, Some(Access::Read), "a"),
            Err(Denied::NoGrant { .. })
        ));
        assert!(matches!(decide(Role::Configurator, Action::Read, None, "a"), Err(Denied::NoGrant { .. })));
        assert_eq!(decide(Role::Admin, Action::Provision, None, "a"), Ok(()));
        assert!(matches!(decide(Role::Configurator, Action::Administer, None, "x"), Err(Denied::Role { .. })));
        assert_eq!(decide(Role::Maintainer, Action::Read, Some(Access::Write), "a"), Ok(()));
    }

    #[test]
    fn grants_read_as_json() {
        let grant: Grant = serde_json::from_str(r#"{"scope":{"dta":"ward-1"},"access":"write"}"#).unwrap();
        assert_eq!(grant, g(Scope::Dta("ward-1".parse().unwrap()), Access::Write));
        let fleet: Grant = serde_json::from_str(r#"{"scope":"fleet","access":"read"}"#).unwrap();
        assert_eq!(fleet.scope, Scope::Fleet);
        assert!(serde_json::from_str::<Grant>(r#"{"scope":"fleet","access":"read","x":1}"#).is_err());
        assert!(check_name("user", "ops/1").is_err());
    }
}
