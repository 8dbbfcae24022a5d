//! twinfleet
