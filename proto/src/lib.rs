//! Wire schemas of twinfleet, generated at build time from `proto/` (protox +
//! tonic-prost-build; no system protoc). No hand-written logic lives here.
//!
//! - [`hub`]: Bigler 2025's `Hub` service, wire-compatible (no protobuf package, so the
//!   paths are `/Hub/...`).
//! - [`device`]: twinfleet's `DeviceGateway` (served by twinfleet) and `DeviceControl`
//!   (served by request-response devices, called by twinfleet).

#![allow(missing_debug_implementations, clippy::all)]

/// Bigler's Hub schema (no protobuf package).
pub mod hub {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// `twinfleet.device.v1`.
pub mod device {
    include!(concat!(env!("OUT_DIR"), "/twinfleet.device.v1.rs"));
}

#[cfg(test)]
mod tests {
    use prost::Message;

    /// The seed's field numbers, checked on the encoded bytes: a schema edit that moves
    /// a field breaks devices in the field, so it must break this test first.
    #[test]
    fn hub_messages_keep_the_seed_field_numbers() {
        let m = super::hub::NumericScalarValues {
            tenant_identifier: "t".into(),
            device_identifier: "d".into(),
            metric_identifier: "m".into(),
            value: 1.5,
            unit: "u".into(),
            display_name: "n".into(),
            timestamp: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
        };
        let bytes = m.encode_to_vec();
        // (field number << 3) | wire type: 1..3, 5, 6 length-delimited (2), 4 fixed64 (1), 7 length-delimited.
        let tags: Vec<u8> = vec![0x0a, 0x12, 0x1a, 0x21, 0x2a, 0x32, 0x3a];
        let mut found = vec![];
        let mut i = 0;
        while i < bytes.len() {
            let tag = bytes[i];
            found.push(tag);
            i += 1;
            match tag & 0x07 {
                2 => i += 1 + bytes[i] as usize,
                1 => i += 8,
                _ => panic!("unexpected wire type in {tag:#x}"),
            }
        }
        assert_eq!(found, tags);
        let s = super::hub::DeviceStatus {
            tenant_identifier: "t".into(),
            device_identifier: "d".into(),
            status: 2,
            timestamp: None,
        };
        assert_eq!(s.encode_to_vec(), vec![0x0a, 1, b't', 0x12, 1, b'd', 0x18, 2]);
    }

    #[test]
    fn hub_service_paths_have_no_package() {
        assert_eq!(super::hub::hub_server::SERVICE_NAME, "Hub");
    }
}
