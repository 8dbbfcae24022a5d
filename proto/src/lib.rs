//! Wire schemas of twinfleet. The .proto files and the tonic/prost code generated from them arrive with the protocol issue; this crate holds no hand-written logic.
