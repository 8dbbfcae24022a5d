//! The services the gateway serves: twinfleet's `DeviceGateway` and Bigler's `Hub`.

use super::*;

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::Command, Status>> + Send>>;
type AckStream = Pin<Box<dyn Stream<Item = Result<pb::BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl DeviceGateway for Gateway {
    type SendTelemetryStream = AckStream;
    type CommandsStream = CommandStream;

    async fn send_telemetry(
        &self,
        req: Request<tonic::Streaming<pb::TelemetryBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let twin = self.authenticate(&req)?;
        let session = self.rt.sessions().open(twin.id().as_str());
        // Checked again once registered: a revocation in between ends nothing otherwise.
        self.authenticate(&req)?;
        let mut batches = req.into_inner();
        let (tx, rx) = mpsc::channel(TELEMETRY_WINDOW);
        let gw = self.clone();
        // One batch at a time, acknowledged after its flush: a device that sends faster
        // than its twin stores is slowed by HTTP/2 flow control, not by a growing queue.
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = batches.message() => m,
                    () = closed(gw.closing.clone()) => Err(shutting_down()),
                    reason = session.closed() => Err(session_ended(reason)),
                };
                let batch = match next {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(oversized(&gw.rt, s))).await;
                        break;
                    }
                };
                // A point with an impossible timestamp rejects its batch (counted); the
                // stream goes on.
                let points: Result<Vec<MetricPoint>, Status> =
                    batch.points.into_iter().map(|p| gw.point(p.metric, p.value, p.timestamp)).collect();
                let points = match points {
                    Ok(p) => p,
                    Err(s) => {
                        let ack =
                            pb::BatchAck { batch_id: batch.batch_id, accepted: 0, error: s.message().to_string() };
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let ack = match twin.ingest(points).await {
                    Ok(n) => pb::BatchAck { batch_id: batch.batch_id, accepted: n as u32, error: String::new() },
                    Err(TwinError::Telemetry(e)) => {
                        gw.rt.rejections().reject(e.reason(), || format!("device {}: {e}", twin.id()));
                        pb::BatchAck { batch_id: batch.batch_id, accepted: 0, error: e.to_string() }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        break;
                    }
                };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn send_logs(&self, req: Request<pb::LogBatch>) -> Result<Response<pb::Ack>, Status> {
        use twinfleet_models::{LogLevel, LogLine};
        let twin = self.authenticate(&req)?;
        let now = self.rt.now();
        let mut lines = Vec::new();
        for l in req.into_inner().lines {
            let level = match pb::LogLevel::try_from(l.level) {
                Ok(pb::LogLevel::Debug) => LogLevel::Debug,
                Ok(pb::LogLevel::Unspecified | pb::LogLevel::Info) => LogLevel::Info,
                Ok(pb::LogLevel::Warning) => LogLevel::Warning,
                Ok(pb::LogLevel::Error) => LogLevel::Error,
                Err(_) => {
                    return Err(
                        self.reject("bad_log", Status::invalid_argument(format!("unknown log level {}", l.level)))
                    );
                }
            };
            let at = match l.timestamp {
                Some(t) => self.timestamp(t)?,
                None => now,
            };
            let app = if l.app.is_empty() { "device".to_string() } else { l.app };
            lines.push(LogLine { at, level, app, text: l.message });
        }
        match twin.append_logs(lines).await {
            // (`seq` is the number of lines stored.)
            Ok(n) => Ok(Response::new(pb::Ack { seq: n as u64 })),
            Err(TwinError::Logs(e)) => Err(self.reject(e.reason(), Status::invalid_argument(e.to_string()))),
            Err(e) => Err(status(e)),
        }
    }

    async fn report_state(&self, req: Request<pb::StateReport>) -> Result<Response<pb::Ack>, Status> {
        let twin = self.authenticate(&req)?;
        let patch = req
            .into_inner()
            .patch
            .ok_or_else(|| self.reject("malformed", Status::invalid_argument("patch is required")))?;
        let patch = struct_to_json(&patch).map_err(|e| self.reject("malformed", Status::invalid_argument(e)))?;
        let seq = twin.report(patch).await.map_err(status)?;
        Ok(Response::new(pb::Ack { seq }))
    }

    async fn commands(&self, req: Request<pb::CommandsRequest>) -> Result<Response<CommandStream>, Status> {
        let twin = self.authenticate(&req)?;
        let twin_id = twin.id().clone();
        let session = self.rt.sessions().open(twin.id().as_str());
        // Checked again once registered: a revocation in between ends nothing otherwise.
        self.authenticate(&req)?;
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        // A newer stream replaces an older one of the same device.
        self.links.streams.insert(twin.id().clone(), tx.clone());
        let links = self.links.clone();
        tokio::spawn(async move {
            // The stream lives until the device drops it or the platform ends the session;
            // then what the twin still waits for goes out on the device's next stream.
            tokio::select! {
                () = tx.closed() => {}
                reason = session.closed() => {
                    let _ = tx.try_send(Err(session_ended(reason)));
                }
            }
            links.streams.remove_if(twin.id(), |_, t| t.same_channel(&tx));
        });
        // What the device has not answered yet, under the same ids.
        let again = self.rt.twin(twin_id.as_str());
        tokio::spawn(async move {
            if let Ok(t) = again
                && let Err(e) = t.command(twinfleet_models::TwinCommand::Resend).await
            {
                tracing::debug!(twin = %t.id(), "pending commands not sent again: {e}");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack_command(&self, req: Request<pb::CommandAck>) -> Result<Response<pb::Ack>, Status> {
        let twin = self.authenticate(&req)?;
        let ack = req.into_inner();
        if ack.command_id.is_empty() || ack.command_id.len() > 256 {
            return Err(self.reject("malformed", Status::invalid_argument("command_id must be 1 to 256 bytes")));
        }
        match twin.ack(ack.command_id, ack.success, ack.message).await {
            Ok(seq) => Ok(Response::new(pb::Ack { seq })),
            Err(e @ TwinError::Rejected(ModelError::UnmatchedAck { .. })) => {
                Err(self.reject(crate::error::classify(&e).reason, status(e)))
            }
            Err(e) => Err(status(e)),
        }
    }
}

#[tonic::async_trait]
impl Hub for Gateway {
    async fn send_numeric_scalar_values(
        &self,
        req: Request<tonic::Streaming<hub::NumericScalarValues>>,
    ) -> Result<Response<()>, Status> {
        let token = Self::token(&req)?.to_string();
        let mut values = req.into_inner();
        let mut twin: Option<TwinHandle> = None;
        let mut session: Option<twinfleet_actors::Session> = None;
        let mut batch = Vec::new();
        let mut stored = 0usize;
        loop {
            let ended = async {
                match &session {
                    Some(s) => s.closed().await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                m = values.message() => m,
                () = closed(self.closing.clone()) => Err(shutting_down()),
                reason = ended => Err(session_ended(reason)),
            };
            let Some(v) = next.map_err(|s| with_stored(oversized(&self.rt, s), stored))? else { break };
            let h = match &twin {
                Some(h) if h.id().as_str() == v.device_identifier => h,
                Some(h) => {
                    let s = Status::permission_denied(format!(
                        "this stream speaks for device {}; a value names {:?}",
                        h.id(),
                        v.device_identifier
                    ));
                    return Err(with_stored(self.reject("wrong_device", s), stored));
                }
                None => {
                    let h = self.rt.authenticate_device(&v.device_identifier, &token).map_err(auth_status)?;
                    self.check_tenant(&h, &v.tenant_identifier).await?;
                    session = Some(self.rt.sessions().open(h.id().as_str()));
                    // Checked again once registered: a revocation in between ends
                    // nothing otherwise.
                    self.rt.authenticate_device(&v.device_identifier, &token).map_err(auth_status)?;
                    twin.insert(h)
                }
            };
            batch.push(self.point(v.metric_identifier, v.value, v.timestamp).map_err(|s| with_stored(s, stored))?);
            if batch.len() >= HUB_BATCH {
                stored += self.store(h, std::mem::take(&mut batch)).await.map_err(|s| with_stored(s, stored))?;
            }
        }
        if let Some(h) = &twin
            && !batch.is_empty()
        {
            self.store(h, batch).await.map_err(|s| with_stored(s, stored))?;
        }
        Ok(Response::new(()))
    }

    async fn send_device_status(&self, req: Request<hub::DeviceStatus>) -> Result<Response<()>, Status> {
        let body = req.get_ref().clone();
        let twin = self.authenticate_as(&req, &body.device_identifier)?;
        let view = twin.get().await.map_err(status)?;
        if let Some(tenant) = view.state.metadata.attributes.get("tenant").and_then(|t| t.as_str())
            && tenant != body.tenant_identifier
        {
            return Err(self.reject(
                "wrong_tenant",
                Status::permission_denied(format!(
                    "device {} is not in tenant {:?}",
                    body.device_identifier, body.tenant_identifier
                )),
            ));
        }
        let status_name = hub::Status::try_from(body.status)
            .map(|s| s.as_str_name().to_lowercase())
            .unwrap_or_else(|_| body.status.to_string());
        let mut patch = serde_json::Map::new();
        let mut hub_status = serde_json::Map::new();
        hub_status.insert("status".into(), status_name.into());
        if let Some(ts) = body.timestamp {
            hub_status.insert("timestamp_ms".into(), self.timestamp(ts)?.0.into());
        }
        patch.insert("hub_status".into(), hub_status.into());
        twin.report(patch).await.map_err(status)?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl pb::provisioning_server::Provisioning for Gateway {
    async fn claim(&self, req: Request<pb::ClaimRequest>) -> Result<Response<pb::ClaimReply>, Status> {
        use pb::claim_reply::Status as S;
        let ty = req
            .metadata()
            .get("x-device-type")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.reject("bad_credentials", Status::unauthenticated("missing x-device-type metadata")))?
            .to_string();
        let token = Self::token(&req).inspect_err(|_| {
            self.rt.rejections().reject("bad_credentials", || format!("claim for {ty:?}: no usable claim token"));
        })?;
        // (`x-device-type` is the claim credential: `<type>`, or `<type>/<batch>`.)
        let cred = self.rt.authenticate_claim(&ty, token).map_err(auth_status)?;
        let source = req.remote_addr().map(|a| a.ip());
        let msg = req.into_inner();
        let identity = msg.identity.map(|i| twinfleet_models::provisioning::Identity {
            serial: i.serial,
            mac: i.mac,
            model: i.model,
            firmware: i.firmware,
            os: i.os,
            arch: i.arch,
            peripherals: i.peripherals,
            region: i.region,
        });
        let claim =
            twinfleet_actors::Claim { device_id: msg.device_id.clone(), identity, source, ..Default::default() };
        let reply = match self.rt.claim_from(&cred, claim).await {
            Ok(twinfleet_actors::ClaimAnswer::Credentials { device_id, token, state, gateway }) => pb::ClaimReply {
                status: S::Credentials as i32,
                device_id: device_id.to_string(),
                token,
                operational: gateway
                    .map(|g| g.grpc)
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| self.operational.clone()),
                state,
                ..Default::default()
            },
            Ok(twinfleet_actors::ClaimAnswer::Pending { state }) => pb::ClaimReply {
                status: S::Pending as i32,
                device_id: msg.device_id,
                state,
                retry_after_ms: 5_000,
                ..Default::default()
            },
            Ok(twinfleet_actors::ClaimAnswer::Refused { state, reason }) => {
                self.rt.rejections().reject("provisioning_refused", || format!("{}: {reason}", msg.device_id));
                pb::ClaimReply {
                    status: S::Refused as i32,
                    device_id: msg.device_id,
                    state,
                    reason,
                    ..Default::default()
                }
            }
            Err(TwinError::AlreadyExists { .. }) => {
                return Err(self.reject(
                    "already_provisioned",
                    Status::already_exists(format!("device {} already exists", msg.device_id)),
                ));
            }
            Err(TwinError::Conflict(why)) => {
                return Err(self.reject("identity_mismatch", Status::failed_precondition(why)));
            }
            Err(e @ TwinError::RateLimited { .. }) => {
                return Err(self.reject("rate_limited", Status::resource_exhausted(e.to_string())));
            }
            Err(e @ (TwinError::Invalid(_) | TwinError::InvalidId(_))) => {
                return Err(self.reject("malformed", Status::invalid_argument(e.to_string())));
            }
            Err(e) => return Err(status(e)),
        };
        Ok(Response::new(reply))
    }
}
