//! The README's library example: a DTA, a device type, a fleet, a report, a layer.
//! Run with `cargo run --example embed -- /tmp/fleet-data`.

use twinfleet::models::ConfigLayer;
use twinfleet::{DeviceTypeSpec, DtaSpec, Platform, TwinSpec};

#[actix_rt::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "./fleet-data".into());
    let platform = Platform::builder(dir).start().await?;
    let building = platform
        .create_dta(DtaSpec {
            id: "building-7".parse()?,
            name: "Building 7".into(),
            parents: vec![],
            layers: Default::default(),
        })
        .await?;
    let sensors = platform
        .create_device_type(DeviceTypeSpec {
            id: "sensor".parse()?,
            model: "TH-1".into(),
            defaults: Default::default(),
            domain: None,
            journal: Default::default(),
            history: Default::default(),
            provisioning: None,
            metrics: None,
        })
        .await?;
    let fleet = (0..100_000)
        .map(|i| TwinSpec {
            dtas: vec!["building-7".parse().unwrap()],
            ..TwinSpec::new(format!("sensor-{i}").parse().unwrap())
        })
        .collect();
    sensors.spawn_fleet(fleet).await?; // running and durable when it returns

    let twin = platform.twin("sensor-42")?; // a typed handle; survives restarts
    twin.report(serde_json::json!({"temp": 21.5}).as_object().unwrap().clone()).await?;
    // Many twins' views in one call, each in its place (batched per arbiter).
    let views = platform.get_many(&["sensor-1", "sensor-2", "no-such-sensor"]).await;
    assert!(views[0].is_ok() && views[1].is_ok() && views[2].is_err());
    building
        .set_layer(
            "maintenance",
            ConfigLayer {
                priority: 10,
                values: serde_json::json!({"window": "02:00-04:00"}).as_object().unwrap().clone(),
            },
        )
        .await?; // reaches every member
    println!("{:?}", twin.get().await?.effective_config);
    platform.shutdown().await; // flushes, releases the data dir
    Ok(())
}
