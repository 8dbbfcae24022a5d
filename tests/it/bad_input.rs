//! Bad input that used to get through, each refused on every edge with a clear error and
//! a counter, and nothing stored: JSON documents nested beyond `MAX_DEPTH` (they used to
//! be stored and then quarantine their twin at the next start).

use crate::mqtt::{addr, embedded_config};
use crate::support::*;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use twinfleet::models::MAX_DEPTH;
use twinfleet_protocols::mqtt::{MqttDevice, MqttGateway, QoS};
use twinfleet_protocols::{GrpcDevice, GrpcGateway, HttpApi};

/// `{"a": {"a": ... 1}}` with `levels` objects.
fn nested(levels: usize) -> Value {
    (0..levels).fold(json!(1), |v, _| json!({ "a": v }))
}

#[actix_rt::test]
async fn documents_nested_too_deep_are_refused_on_every_edge_and_the_twin_restarts_clean() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), None, test_settings()).await;
    fleet(&p, "probe", json!({}), "d", 1, |_| vec![]).await;
    let token = p.issue_device_token("d-0").await.unwrap();
    let admin = admin_token(&p).await;
    let http = HttpApi::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let grpc = GrpcGateway::start(p.runtime().clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let mqtt = MqttGateway::start(p.runtime().clone(), embedded_config()).await.unwrap();
    let r = &p.rejections();
    let too_deep = json!({ "x": nested(MAX_DEPTH) }); // MAX_DEPTH + 1 levels
    let deepest = nested(MAX_DEPTH - 1); // inside {"ok": ...}: exactly MAX_DEPTH levels

    // HTTP: 400 with the limit named.
    let (h, body) = (http.local_addr(), too_deep.to_string());
    let (s, b) =
        actix_rt::task::spawn_blocking(move || http_as(h, &admin, "PATCH", "/api/v1/twins/d-0/desired", Some(&body)))
            .await
            .unwrap();
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid")), "{b}");
    assert!(b["message"].as_str().unwrap().contains(&format!("deeper than {MAX_DEPTH} levels")), "{b}");

    // MQTT: counted as too_deep, the connection stays.
    let device = MqttDevice::connect(&addr(mqtt.operational()), "d-0", &token).await.unwrap();
    device.publish_raw("devices/d-0/state", QoS::AtLeastOnce, too_deep.to_string().into_bytes()).await.unwrap();
    eventually("the deep MQTT report is counted", || async { (r.count("too_deep") == 1).then_some(()) }).await;
    assert!(device.is_connected());

    // gRPC: INVALID_ARGUMENT.
    let channel = Channel::from_shared(format!("http://{}", grpc.local_addr())).unwrap().connect().await.unwrap();
    let mut g = GrpcDevice::on_channel(channel, "d-0", &token);
    let err = g.report(too_deep.as_object().unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Exactly the limit is accepted, and nothing deeper reached the twin.
    g.report(&obj(json!({ "ok": deepest }))).await.unwrap();
    let view = p.twin("d-0").unwrap().get().await.unwrap();
    assert_eq!(view.state.reported.keys().collect::<Vec<_>>(), ["ok"]);
    assert!(view.state.desired.is_empty());
    // The documents of groups and device types are bounded the same way.
    let mut layers = std::collections::BTreeMap::new();
    layers.insert("deep".to_string(), twinfleet::models::ConfigLayer { priority: 1, values: obj(too_deep.clone()) });
    let dta = twinfleet::DtaSpec { id: "g".parse().unwrap(), name: String::new(), parents: vec![], layers };
    assert!(matches!(p.create_dta(dta).await, Err(twinfleet::TwinError::Rejected(_))));
    let ty = twinfleet::DeviceTypeSpec {
        id: "deep".parse().unwrap(),
        model: String::new(),
        defaults: obj(too_deep.clone()),
        domain: None,
        journal: Default::default(),
        history: Default::default(),
        provisioning: None,
        metrics: None,
    };
    assert!(matches!(p.create_device_type(ty).await, Err(twinfleet::TwinError::Rejected(_))));

    device.disconnect().await;
    mqtt.stop().await;
    grpc.stop().await;
    http.stop().await;
    p.shutdown().await;

    // Whatever was accepted reads back: the twin starts, not quarantined.
    let p = start(dir.path(), None, test_settings()).await;
    let view = p.twin("d-0").unwrap().get().await.expect("the twin starts from its record");
    assert_eq!(view.state.reported["ok"], deepest);
    p.shutdown().await;
}
