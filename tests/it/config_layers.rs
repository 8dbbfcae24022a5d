//! DTA configuration layers: a layer change reaches every member's effective
//! configuration, through nesting too, and survives a restart.

use crate::support::*;
use serde_json::{Value, json};
use twinfleet::models::{ConfigLayer, LayerSource};
use twinfleet::{DtaSpec, Platform};

async fn effective(p: &Platform, id: &str, key: &str) -> Value {
    p.twin(id).unwrap().get().await.unwrap().effective_config.values.get(key).cloned().unwrap_or(Value::Null)
}

#[actix_rt::test]
async fn a_dta_layer_change_reaches_every_member_and_nested_members() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    {
        let p = start(dir.path(), None, test_settings()).await;
        p.create_dta(DtaSpec {
            id: did("building-7"),
            name: "Building 7".into(),
            parents: vec![],
            layers: Default::default(),
        })
        .await
        .unwrap();
        let mut floor = DtaSpec {
            id: did("floor-2"),
            name: "Floor 2".into(),
            parents: vec![did("building-7")],
            layers: Default::default(),
        };
        floor.layers.insert("tuning".into(), ConfigLayer { priority: 20, values: obj(json!({"interval": 15})) });
        p.create_dta(floor).await.unwrap();
        // Twins 0..100 on floor 2 (so in building 7 through nesting), 100..200 in the
        // building directly, 200..300 in neither.
        fleet(&p, "thermostat", json!({"interval": 60, "window": "none"}), "t", n, |i| match i {
            0..100 => vec![did("floor-2")],
            100..200 => vec![did("building-7")],
            _ => vec![],
        })
        .await;
        assert_eq!(effective(&p, "t-5", "interval").await, json!(15));
        assert_eq!(effective(&p, "t-150", "interval").await, json!(60));

        let building = p.dta("building-7").unwrap();
        let reached = building
            .set_layer("maintenance", ConfigLayer { priority: 10, values: obj(json!({"window": "02:00-04:00"})) })
            .await
            .unwrap();
        assert_eq!(reached, 100, "direct members reached");
        for i in 0..n {
            let want = if i < 200 { json!("02:00-04:00") } else { json!("none") };
            // Nested members get the push from floor-2, asynchronously but promptly.
            let id = format!("t-{i}");
            eventually(&format!("{id} sees the building window"), || async {
                (effective(&p, &id, "window").await == want).then_some(())
            })
            .await;
        }
        // Priorities: the floor's tuning (20) beats a building layer (10) for its members.
        building
            .set_layer(
                "maintenance",
                ConfigLayer { priority: 10, values: obj(json!({"window": "03:00-05:00", "interval": 45})) },
            )
            .await
            .unwrap();
        eventually("nested push", || async {
            (effective(&p, "t-0", "window").await == json!("03:00-05:00")).then_some(())
        })
        .await;
        assert_eq!(effective(&p, "t-0", "interval").await, json!(15));
        assert_eq!(effective(&p, "t-100", "interval").await, json!(45));
        let view = p.twin("t-0").unwrap().get().await.unwrap();
        assert!(
            matches!(&view.effective_config.sources["interval"], LayerSource::Dta { dta, .. } if dta.as_str() == "floor-2")
        );

        // The twin's own override wins over every layer.
        let t = p.twin("t-1").unwrap();
        t.command(twinfleet::models::TwinCommand::SetOverrides(obj(json!({"interval": 5})))).await.unwrap();
        assert_eq!(effective(&p, "t-1", "interval").await, json!(5));

        // Joining later picks up the current layers.
        building.join(&tid("t-250")).await.unwrap();
        assert_eq!(effective(&p, "t-250", "window").await, json!("03:00-05:00"));
        p.shutdown().await;
    }
    let p = start(dir.path(), None, test_settings()).await;
    assert_eq!(p.restore_report().twins, n);
    assert_eq!(effective(&p, "t-0", "window").await, json!("03:00-05:00"));
    assert_eq!(effective(&p, "t-250", "window").await, json!("03:00-05:00"));
    assert_eq!(effective(&p, "t-1", "interval").await, json!(5));
    assert_eq!(effective(&p, "t-299", "window").await, json!("none"));
    assert_eq!(p.dta("building-7").unwrap().info().members, 101);
    assert_eq!(p.dta("floor-2").unwrap().info().children, Vec::<twinfleet::models::DtaId>::new());
    assert_eq!(p.dta("building-7").unwrap().info().children, vec![did("floor-2")]);
    p.shutdown().await;
}

#[actix_rt::test]
async fn unknown_dtas_and_duplicates_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    let ty = fleet(&p, "plug", json!({}), "p", 3, |_| vec![]).await;
    let err = ty
        .spawn_fleet(vec![twinfleet::TwinSpec { dtas: vec![did("nowhere")], ..twinfleet::TwinSpec::new(tid("p-9")) }])
        .await
        .unwrap_err();
    assert!(matches!(err, twinfleet::TwinError::UnknownDta(_)), "{err}");
    let err = ty
        .spawn_fleet(vec![twinfleet::TwinSpec::new(tid("p-10")), twinfleet::TwinSpec::new(tid("p-1"))])
        .await
        .unwrap_err();
    assert!(matches!(err, twinfleet::TwinError::AlreadyExists { .. }), "{err}");
    assert!(p.twin("p-10").is_err(), "all or nothing");
    assert_eq!(p.twin_count(), 3);
    let err = p
        .create_dta(DtaSpec {
            id: did("child"),
            name: String::new(),
            parents: vec![did("missing")],
            layers: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, twinfleet::TwinError::UnknownDta(_)));
    p.shutdown().await;
}
