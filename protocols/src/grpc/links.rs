//! The twins' device link over gRPC: a device's open command stream, or a call to the
//! DeviceControl server a request-response device hosts.

use super::*;
use tonic::transport::Channel;
use twinfleet_proto::device::device_control_client::DeviceControlClient;

/// The twins' link to their gRPC devices: a device's open `Commands` stream if it has
/// one; otherwise, for a request-response device (the twin's `grpc_address`
/// attribute), a call to the `DeviceControl` server it hosts.
#[derive(Debug)]
pub struct GrpcLinks {
    pub(super) rt: TwinRuntime,
    pub(super) streams: DashMap<TwinId, mpsc::Sender<Result<pb::Command, Status>>>,
}

/// Deadline of one call to a device-hosted DeviceControl server.
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl GrpcLinks {
    /// Calls a device's DeviceControl server (desired state and configuration:
    /// `SetConfiguration`; apps: `InstallApp`), records the device's answer in the twin's
    /// journal, and reports the state the device then returns. Failures are logged; the
    /// twin's watchdog retries desired state.
    fn call_device(&self, twin: &TwinId, addr: &str, command_id: CommandId, body: pb::command::Body) {
        let (rt, twin, addr) = (self.rt.clone(), twin.clone(), addr.to_string());
        actix_rt::spawn(async move {
            let call = async {
                let channel = Channel::from_shared(format!("http://{addr}"))
                    .map_err(|e| e.to_string())?
                    .connect_timeout(CONTROL_TIMEOUT)
                    .timeout(CONTROL_TIMEOUT)
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach {addr}: {e}"))?;
                let mut device = DeviceControlClient::new(channel);
                let reply = match body {
                    pb::command::Body::ApplyDesired(s) => {
                        device.set_configuration(pb::SetConfigurationRequest { configuration: Some(s) }).await
                    }
                    pb::command::Body::SetConfiguration(req) => device.set_configuration(req).await,
                    pb::command::Body::InstallApp(req) => device.install_app(req).await,
                    pb::command::Body::UninstallApp(req) => device.uninstall_app(req).await,
                };
                let reply = reply.map_err(|s| s.to_string())?.into_inner();
                let state = device.get_state(pb::GetStateRequest {}).await.map_err(|s| s.to_string())?.into_inner();
                Ok::<_, String>((reply, struct_to_json(&state)?))
            };
            let Ok(handle) = rt.twin(twin.as_str()) else { return };
            match call.await {
                Ok((reply, state)) => {
                    if let Err(e) = handle.ack(command_id.to_string(), reply.success, reply.message).await {
                        tracing::warn!(%twin, "cannot record the device's answer: {e}");
                    }
                    if !state.is_empty()
                        && let Err(e) = handle.report(state).await
                    {
                        tracing::warn!(%twin, "cannot report the device's state: {e}");
                    }
                }
                Err(e) => tracing::info!(%twin, "DeviceControl call failed (the twin retries): {e}"),
            }
        });
    }
}

impl DeviceLink for GrpcLinks {
    fn preference(&self, twin: &TwinId, metadata: &Metadata) -> u8 {
        let stream = self.streams.get(twin).is_some_and(|t| !t.is_closed());
        if stream || metadata.attributes.get("grpc_address").is_some_and(|a| a.is_string()) { 2 } else { 0 }
    }

    fn deliver(&self, twin: &TwinId, metadata: &Metadata, id: CommandId, cmd: DeviceCommand) -> Result<(), String> {
        let body = match cmd {
            DeviceCommand::ApplyDesired { desired, .. } => pb::command::Body::ApplyDesired(json_to_struct(&desired)),
            DeviceCommand::SetConfiguration { configuration } => {
                pb::command::Body::SetConfiguration(pb::SetConfigurationRequest {
                    configuration: Some(json_to_struct(&configuration)),
                })
            }
            DeviceCommand::InstallApp { app, version, artifact_url } => {
                pb::command::Body::InstallApp(pb::InstallAppRequest { app, version, artifact_url })
            }
            DeviceCommand::UninstallApp { app } => pb::command::Body::UninstallApp(pb::UninstallAppRequest { app }),
        };
        let Some(tx) = self.streams.get(twin).map(|t| t.clone()) else {
            return match metadata.attributes.get("grpc_address").and_then(|a| a.as_str()) {
                Some(addr) => {
                    self.call_device(twin, addr, id, body);
                    Ok(())
                }
                None => Err(format!("device {twin} has no open gRPC command stream and no grpc_address")),
            };
        };
        match tx.try_send(Ok(pb::Command { command_id: id.to_string(), body: Some(body) })) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(format!("command queue of device {twin} is full")),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.streams.remove_if(twin, |_, t| t.is_closed());
                Err(format!("device {twin} closed its command stream"))
            }
        }
    }
}
