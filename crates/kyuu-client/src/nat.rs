//! NAT behaviour discovery ([RFC 5780](https://www.rfc-editor.org/rfc/rfc5780)), sans-IO.
//!
//! [`NatProbe`] runs the tests of RFC 5780 §4 over one UDP socket, in this order:
//!
//! 1. **Test I** (§4.3, §4.4): a plain Binding request to the server's primary address gives the
//!    mapped (public) address and the server's OTHER-ADDRESS. Mapped address = local address means
//!    no NAT. No OTHER-ADDRESS means the server cannot run the other tests.
//! 2. **Filtering test II** (§4.4): CHANGE-REQUEST "change IP and port". An answer (from the
//!    alternate IP and port) means endpoint-independent filtering.
//! 3. **Filtering test III**: CHANGE-REQUEST "change port". An answer (from the primary IP,
//!    alternate port) means address-dependent filtering; silence means address-and-port-dependent.
//! 4. **Mapping test II** (§4.3): Binding to the alternate IP, primary port. Same mapped address
//!    as test I means endpoint-independent mapping.
//! 5. **Mapping test III**: Binding to the alternate IP and port. Same mapped address as test II
//!    means address-dependent mapping, otherwise address-and-port-dependent.
//! 6. **Hairpinning** (§4.5): a Binding request to our own mapped address; receiving it back means
//!    the NAT hairpins.
//!
//! The filtering tests run *before* the mapping tests on purpose: mapping tests II and III send to
//! the alternate address, which would open the NAT's filter for exactly the addresses the filtering
//! tests expect answers from, and every NAT would then look endpoint-independent.
//!
//! # Contract
//!
//! After [`NatProbe::new`] and after every [`NatProbe::handle_input`] /
//! [`NatProbe::handle_timeout`], drain [`NatProbe::poll_transmit`], then sleep until
//! [`NatProbe::poll_timeout`] (or until a datagram arrives). When [`NatProbe::outcome`] returns
//! `Some`, the probe is finished. Time only comes in as arguments, so the whole procedure can be
//! tested in virtual time.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_stun::{attr, method, Class, Message, TransactionId};
use serde::Serialize;

use crate::binding::{self, BindingResponse};
use crate::transaction::{RetransmitConfig, Timer, TimerAction};

/// How a NAT maps internal addresses to external ones (RFC 4787 §4.1, RFC 5780 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

/// Which inbound packets a NAT lets through to a mapping (RFC 4787 §5, RFC 5780 §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

impl fmt::Display for Filtering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

/// The classic RFC 3489 names, still what most people ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatType {
    /// No NAT and no filtering.
    OpenInternet,
    /// No NAT, but a firewall filters unsolicited inbound packets.
    FirewallNoNat,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    RestrictedCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestrictedCone,
    /// Mapping depends on the destination.
    Symmetric,
    /// Not enough answers to tell.
    Unknown,
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatType::OpenInternet => "open internet",
            NatType::FirewallNoNat => "no NAT, filtering firewall",
            NatType::FullCone => "full cone",
            NatType::RestrictedCone => "restricted cone",
            NatType::PortRestrictedCone => "port-restricted cone",
            NatType::Symmetric => "symmetric",
            NatType::Unknown => "unknown",
        })
    }
}

/// The classic name for a combination of observations.
pub fn classify(
    behind_nat: bool,
    mapping: Option<Mapping>,
    filtering: Option<Filtering>,
) -> NatType {
    match (behind_nat, mapping, filtering) {
        (false, _, Some(Filtering::EndpointIndependent)) => NatType::OpenInternet,
        (false, _, Some(Filtering::AddressDependent | Filtering::AddressAndPortDependent)) => {
            NatType::FirewallNoNat
        }
        (false, _, None) => NatType::Unknown,
        (true, Some(Mapping::AddressDependent | Mapping::AddressAndPortDependent), _) => {
            NatType::Symmetric
        }
        (true, Some(Mapping::EndpointIndependent), Some(Filtering::EndpointIndependent)) => {
            NatType::FullCone
        }
        (true, Some(Mapping::EndpointIndependent), Some(Filtering::AddressDependent)) => {
            NatType::RestrictedCone
        }
        (true, Some(Mapping::EndpointIndependent), Some(Filtering::AddressAndPortDependent)) => {
            NatType::PortRestrictedCone
        }
        (true, None, _) | (true, Some(Mapping::EndpointIndependent), None) => NatType::Unknown,
    }
}

/// Mapped addresses seen by each mapping test.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MappedAddresses {
    /// Test I: primary IP, primary port.
    pub primary: Option<SocketAddr>,
    /// Test II: alternate IP, primary port.
    pub alternate_ip: Option<SocketAddr>,
    /// Test III: alternate IP, alternate port.
    pub alternate_ip_port: Option<SocketAddr>,
}

/// What the probe found out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatReport {
    /// The server's primary address (where test I went).
    pub server: SocketAddr,
    /// Our local address as the probe was told it.
    pub local: SocketAddr,
    /// The public (server-reflexive) address from test I.
    pub public: SocketAddr,
    /// Whether the public address differs from the local one.
    pub behind_nat: bool,
    /// Whether the server supports RFC 5780 (it sent OTHER-ADDRESS).
    pub rfc5780: bool,
    /// The server's alternate address (OTHER-ADDRESS).
    pub other_address: Option<SocketAddr>,
    /// RESPONSE-ORIGIN of the answer to test I.
    pub response_origin: Option<SocketAddr>,
    /// The server's SOFTWARE attribute.
    pub software: Option<String>,
    pub mapping: Option<Mapping>,
    pub filtering: Option<Filtering>,
    /// `None` when not tested (not behind a NAT, or disabled).
    pub hairpinning: Option<bool>,
    pub nat_type: NatType,
    pub mapped_addresses: MappedAddresses,
    /// Why some tests could not be run or concluded, in plain words.
    pub problems: Vec<String>,
    /// RFC 5780 tests the server answered from another address than the test requires (a
    /// misconfigured or non-conforming server): those tests are left unconcluded, not
    /// misclassified.
    pub wrong_source: Vec<WrongSource>,
}

/// An RFC 5780 answer that came from the wrong address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WrongSource {
    /// Which test: "filtering: change IP and port", "filtering: change port",
    /// "mapping: alternate IP", "mapping: alternate IP and port".
    pub test: &'static str,
    /// Where the answer had to come from.
    pub expected: SocketAddr,
    /// Where it came from.
    pub from: SocketAddr,
}

/// The message printed when the server has no OTHER-ADDRESS.
pub const NO_RFC5780: &str =
    "server does not support RFC 5780 (no OTHER-ADDRESS); only the mapped address is known";

/// Why the probe failed as a whole (test I got no usable answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "no response from {server} after {transmissions} transmissions in {:.1}s",
        waited.as_secs_f64()
    )]
    NoResponse {
        server: SocketAddr,
        transmissions: u32,
        waited: Duration,
    },
    #[error("{server} answered the Binding request with error {code} ({reason})")]
    ErrorResponse {
        server: SocketAddr,
        code: u16,
        reason: String,
    },
    #[error("could not encode a request: {0}")]
    Encode(#[from] kyuu_stun::Error),
}

/// Probe options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Timing of every request (the filtering tests wait for its full timeout when unanswered).
    pub retransmit: RetransmitConfig,
    /// Run the hairpinning test.
    pub hairpin: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            retransmit: RetransmitConfig::default(),
            hairpin: true,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    TestI,
    FilterChangeIpPort,
    FilterChangePort,
    MapAltIp,
    MapAltIpPort,
    Hairpin,
}

impl Step {
    fn change_request(self) -> u32 {
        match self {
            Step::FilterChangeIpPort => attr::CHANGE_IP | attr::CHANGE_PORT,
            Step::FilterChangePort => attr::CHANGE_PORT,
            Step::TestI | Step::MapAltIp | Step::MapAltIpPort | Step::Hairpin => 0,
        }
    }
}

#[derive(Debug)]
struct Pending {
    step: Step,
    tid: TransactionId,
    dst: SocketAddr,
    started: Instant,
    timer: Timer,
}

/// What a step's transaction ended with.
enum Answer {
    Response {
        from: SocketAddr,
        resp: BindingResponse,
    },
    /// Our own hairpinned request came back.
    OwnRequest,
    Timeout {
        transmissions: u32,
        waited: Duration,
    },
}

/// The RFC 5780 NAT behaviour discovery state machine. See the module docs for the contract.
#[derive(Debug)]
pub struct NatProbe {
    cfg: ProbeConfig,
    server: SocketAddr,
    local: SocketAddr,
    pending: Option<Pending>,
    transmits: Vec<Transmit>,
    report: Option<NatReport>,
    outcome: Option<Result<NatReport, ProbeError>>,
    /// Where the step being concluded sent its request.
    last_dst: SocketAddr,
}

impl NatProbe {
    /// Starts probing `server` from a socket bound to `local` (a concrete IP, not the wildcard,
    /// or the probe cannot tell whether there is a NAT).
    pub fn new(server: SocketAddr, local: SocketAddr, cfg: ProbeConfig, now: Instant) -> Self {
        let mut probe = NatProbe {
            cfg,
            server,
            local,
            pending: None,
            transmits: Vec::new(),
            report: None,
            outcome: None,
            last_dst: server,
        };
        probe.start(Step::TestI, server, now);
        probe
    }

    /// The result, once the probe is finished.
    pub fn outcome(&self) -> Option<&Result<NatReport, ProbeError>> {
        self.outcome.as_ref()
    }

    /// Takes the result, once the probe is finished.
    pub fn take_outcome(&mut self) -> Option<Result<NatReport, ProbeError>> {
        self.outcome.take()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.transmits.is_empty() {
            None
        } else {
            Some(self.transmits.remove(0))
        }
    }

    /// When [`NatProbe::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.timer.next_wakeup())
    }

    /// Advances retransmission timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        match p.timer.poll(now) {
            TimerAction::Wait(_) => {}
            TimerAction::Send => {
                let (tid, dst, change) = (p.tid, p.dst, p.step.change_request());
                self.queue_request(tid, dst, change);
            }
            TimerAction::Expired => {
                let transmissions = p.timer.transmissions();
                let waited = now.saturating_duration_since(p.started);
                self.finish_step(
                    now,
                    Answer::Timeout {
                        transmissions,
                        waited,
                    },
                );
            }
        }
    }

    /// Feeds a received datagram. Anything that is not an answer to the current test is ignored
    /// (late answers to an earlier test carry another transaction id).
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Some(p) = self.pending.as_ref() else {
            return;
        };
        let Ok(msg) = Message::parse(data) else {
            return;
        };
        if *msg.transaction_id() != p.tid || msg.method() != method::BINDING {
            return;
        }
        if msg.class() == Class::Request {
            if p.step == Step::Hairpin {
                self.finish_step(now, Answer::OwnRequest);
            }
            return;
        }
        // A malformed answer is treated like a lost one: the retransmission may fare better.
        if let Ok(Some(resp)) = binding::parse_response(&msg) {
            self.finish_step(now, Answer::Response { from, resp });
        }
    }

    fn queue_request(&mut self, tid: TransactionId, dst: SocketAddr, change: u32) {
        let mut buf = vec![0u8; binding::MAX_REQUEST_LEN];
        match binding::write_request(&mut buf, tid, change, true) {
            Ok(n) => {
                buf.truncate(n);
                self.transmits.push(Transmit { dst, payload: buf });
            }
            Err(e) => self.fail(ProbeError::Encode(e)),
        }
    }

    fn start(&mut self, step: Step, dst: SocketAddr, now: Instant) {
        let mut timer = Timer::new(self.cfg.retransmit, now);
        let tid = binding::new_transaction_id();
        if let TimerAction::Send = timer.poll(now) {
            self.queue_request(tid, dst, step.change_request());
        }
        self.pending = Some(Pending {
            step,
            tid,
            dst,
            started: now,
            timer,
        });
    }

    fn fail(&mut self, err: ProbeError) {
        self.pending = None;
        self.outcome = Some(Err(err));
    }

    fn done(&mut self) {
        self.pending = None;
        if let Some(mut r) = self.report.take() {
            r.nat_type = classify(r.behind_nat, r.mapping, r.filtering);
            self.outcome = Some(Ok(r));
        }
    }

    fn finish_step(&mut self, now: Instant, answer: Answer) {
        let Some(p) = self.pending.take() else {
            return;
        };
        self.last_dst = p.dst;
        match p.step {
            Step::TestI => self.after_test_i(now, answer),
            Step::FilterChangeIpPort => self.after_filter_ip_port(now, answer),
            Step::FilterChangePort => self.after_filter_port(now, answer),
            Step::MapAltIp => self.after_map_alt_ip(now, answer),
            Step::MapAltIpPort => self.after_map_alt_ip_port(now, answer),
            Step::Hairpin => {
                if let Some(r) = self.report.as_mut() {
                    r.hairpinning = Some(matches!(answer, Answer::OwnRequest));
                }
                self.done();
            }
        }
    }

    fn after_test_i(&mut self, now: Instant, answer: Answer) {
        match answer {
            Answer::Timeout {
                transmissions,
                waited,
            } => self.fail(ProbeError::NoResponse {
                server: self.server,
                transmissions,
                waited,
            }),
            Answer::Response {
                resp: BindingResponse::Error { code, reason },
                ..
            } => self.fail(ProbeError::ErrorResponse {
                server: self.server,
                code,
                reason,
            }),
            Answer::OwnRequest => {}
            Answer::Response {
                resp:
                    BindingResponse::Success {
                        mapped,
                        other,
                        origin,
                        software,
                    },
                ..
            } => {
                let behind_nat = mapped != self.local;
                let mut report = NatReport {
                    server: self.server,
                    local: self.local,
                    public: mapped,
                    behind_nat,
                    rfc5780: other.is_some(),
                    other_address: other,
                    response_origin: origin,
                    software,
                    mapping: None,
                    filtering: None,
                    hairpinning: None,
                    nat_type: NatType::Unknown,
                    mapped_addresses: MappedAddresses {
                        primary: Some(mapped),
                        ..MappedAddresses::default()
                    },
                    problems: Vec::new(),
                    wrong_source: Vec::new(),
                };
                match other {
                    Some(other) if other.ip() == self.server.ip() => {
                        report.problems.push(format!(
                            "the server's OTHER-ADDRESS {other} has the same IP as its primary \
                             address; the tests need two IP addresses"
                        ));
                        self.report = Some(report);
                        self.after_mapping(now);
                    }
                    Some(_) => {
                        self.report = Some(report);
                        self.start(Step::FilterChangeIpPort, self.server, now);
                    }
                    None => {
                        report.problems.push(NO_RFC5780.to_owned());
                        self.report = Some(report);
                        self.after_mapping(now);
                    }
                }
            }
        }
    }

    fn other(&self) -> Option<SocketAddr> {
        self.report.as_ref().and_then(|r| r.other_address)
    }

    fn wrong(&mut self, test: &'static str, expected: SocketAddr, from: SocketAddr) {
        if let Some(r) = self.report.as_mut() {
            r.wrong_source.push(WrongSource {
                test,
                expected,
                from,
            });
        }
    }

    fn problem(&mut self, text: String) {
        if let Some(r) = self.report.as_mut() {
            r.problems.push(text);
        }
    }

    fn set_filtering(&mut self, f: Filtering) {
        if let Some(r) = self.report.as_mut() {
            r.filtering = Some(f);
        }
    }

    fn set_mapping(&mut self, m: Mapping) {
        if let Some(r) = self.report.as_mut() {
            r.mapping = Some(m);
        }
    }

    fn start_mapping(&mut self, now: Instant) {
        match self.other() {
            Some(other) => {
                let dst = SocketAddr::new(other.ip(), self.server.port());
                self.start(Step::MapAltIp, dst, now);
            }
            None => self.after_mapping(now),
        }
    }

    fn after_filter_ip_port(&mut self, now: Instant, answer: Answer) {
        let Some(other) = self.other() else {
            return self.after_mapping(now);
        };
        match answer {
            Answer::Response {
                from,
                resp: BindingResponse::Success { .. },
            } if from == other => {
                self.set_filtering(Filtering::EndpointIndependent);
                self.start_mapping(now);
            }
            Answer::Response {
                from,
                resp: BindingResponse::Success { .. },
            } => {
                self.problem(format!(
                    "the answer to CHANGE-REQUEST (change IP and port) came from {from}, not from \
                     OTHER-ADDRESS {other}; the server ignores CHANGE-REQUEST, so filtering is unknown"
                ));
                self.wrong("filtering: change IP and port", other, from);
                self.start_mapping(now);
            }
            Answer::Response {
                resp: BindingResponse::Error { code, reason },
                ..
            } => {
                self.problem(format!(
                    "the server refused CHANGE-REQUEST with error {code} ({reason}); filtering is unknown"
                ));
                self.start_mapping(now);
            }
            Answer::Timeout { .. } => self.start(Step::FilterChangePort, self.server, now),
            Answer::OwnRequest => self.start_mapping(now),
        }
    }

    fn after_filter_port(&mut self, now: Instant, answer: Answer) {
        let Some(other) = self.other() else {
            return self.after_mapping(now);
        };
        let expected = SocketAddr::new(self.server.ip(), other.port());
        match answer {
            Answer::Response {
                from,
                resp: BindingResponse::Success { .. },
            } if from == expected => self.set_filtering(Filtering::AddressDependent),
            Answer::Response {
                from,
                resp: BindingResponse::Success { .. },
            } => {
                self.problem(format!(
                    "the answer to CHANGE-REQUEST (change port) came from {from}, not from \
                     {expected}; filtering is unknown"
                ));
                self.wrong("filtering: change port", expected, from);
            }
            Answer::Response {
                resp: BindingResponse::Error { code, reason },
                ..
            } => self.problem(format!(
                "the server refused CHANGE-REQUEST (change port) with error {code} ({reason}); \
                 filtering is unknown"
            )),
            Answer::Timeout { .. } => self.set_filtering(Filtering::AddressAndPortDependent),
            Answer::OwnRequest => {}
        }
        self.start_mapping(now);
    }

    fn after_map_alt_ip(&mut self, now: Instant, answer: Answer) {
        let Some(other) = self.other() else {
            return self.after_mapping(now);
        };
        let primary = self.report.as_ref().map(|r| r.public);
        let dst = self.last_dst;
        match answer {
            Answer::Response {
                from,
                resp: BindingResponse::Success { .. },
            } if from != dst => {
                self.problem(format!(
                    "the answer to the request sent to the alternate address {dst} came from \
                     {from}; mapping is unknown"
                ));
                self.wrong("mapping: alternate IP", dst, from);
                self.after_mapping(now);
            }
            Answer::Response {
                resp: BindingResponse::Success { mapped, .. },
                ..
            } => {
                if let Some(r) = self.report.as_mut() {
                    r.mapped_addresses.alternate_ip = Some(mapped);
                }
                if Some(mapped) == primary {
                    self.set_mapping(Mapping::EndpointIndependent);
                    self.after_mapping(now);
                } else {
                    self.start(Step::MapAltIpPort, other, now);
                }
            }
            Answer::Response {
                resp: BindingResponse::Error { code, reason },
                from,
            } => {
                self.problem(format!(
                    "{from} answered with error {code} ({reason}); mapping is unknown"
                ));
                self.after_mapping(now);
            }
            Answer::Timeout { .. } => {
                let dst = SocketAddr::new(other.ip(), self.server.port());
                self.problem(format!(
                    "no response from the alternate address {dst}; mapping is unknown"
                ));
                self.after_mapping(now);
            }
            Answer::OwnRequest => self.after_mapping(now),
        }
    }

    fn after_map_alt_ip_port(&mut self, now: Instant, answer: Answer) {
        let alt_ip = self
            .report
            .as_ref()
            .and_then(|r| r.mapped_addresses.alternate_ip);
        let dst = self.last_dst;
        match answer {
            Answer::Response {
                from,
                resp: BindingResponse::Success { .. },
            } if from != dst => {
                self.problem(format!(
                    "the answer to the request sent to {dst} came from {from}; mapping is only \
                     known to be endpoint-dependent"
                ));
                self.wrong("mapping: alternate IP and port", dst, from);
            }
            Answer::Response {
                resp: BindingResponse::Success { mapped, .. },
                ..
            } => {
                if let Some(r) = self.report.as_mut() {
                    r.mapped_addresses.alternate_ip_port = Some(mapped);
                }
                self.set_mapping(if Some(mapped) == alt_ip {
                    Mapping::AddressDependent
                } else {
                    Mapping::AddressAndPortDependent
                });
            }
            Answer::Response {
                resp: BindingResponse::Error { code, reason },
                from,
            } => self.problem(format!(
                "{from} answered with error {code} ({reason}); mapping is only known to be \
                 endpoint-dependent"
            )),
            Answer::Timeout { .. } => self.problem(format!(
                "no response from the alternate address {}; mapping is only known to be \
                 endpoint-dependent",
                self.other().map_or_else(String::new, |o| o.to_string())
            )),
            Answer::OwnRequest => {}
        }
        self.after_mapping(now);
    }

    fn after_mapping(&mut self, now: Instant) {
        let Some(r) = self.report.as_ref() else {
            return;
        };
        if self.cfg.hairpin && r.behind_nat {
            let dst = r.public;
            self.start(Step::Hairpin, dst, now);
        } else {
            self.done();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kyuu_stun::MessageBuilder;

    #[test]
    fn classic_names() {
        use Filtering as F;
        use Mapping as M;
        let eim = Some(M::EndpointIndependent);
        assert_eq!(
            classify(false, eim, Some(F::EndpointIndependent)),
            NatType::OpenInternet
        );
        assert_eq!(
            classify(false, eim, Some(F::AddressAndPortDependent)),
            NatType::FirewallNoNat
        );
        assert_eq!(
            classify(true, eim, Some(F::EndpointIndependent)),
            NatType::FullCone
        );
        assert_eq!(
            classify(true, eim, Some(F::AddressDependent)),
            NatType::RestrictedCone
        );
        assert_eq!(
            classify(true, eim, Some(F::AddressAndPortDependent)),
            NatType::PortRestrictedCone
        );
        assert_eq!(
            classify(
                true,
                Some(M::AddressAndPortDependent),
                Some(F::AddressAndPortDependent)
            ),
            NatType::Symmetric
        );
        assert_eq!(
            classify(true, Some(M::AddressDependent), None),
            NatType::Symmetric
        );
        assert_eq!(classify(true, None, None), NatType::Unknown);
    }

    /// A simulated RFC 5780 server with two IPs and two ports, behind a simulated NAT, in
    /// virtual time.
    struct World {
        primary: SocketAddr,
        other: SocketAddr,
        local: SocketAddr,
        mapping: Mapping,
        filtering: Filtering,
        hairpin: bool,
        rfc5780: bool,
        /// A misbehaving server: every answer comes from the primary address.
        always_primary: bool,
        /// Destinations the client has sent to (the NAT's filter state).
        contacted: Vec<SocketAddr>,
    }

    impl World {
        fn new(mapping: Mapping, filtering: Filtering) -> Self {
            World {
                primary: "192.0.2.1:3478".parse().unwrap(),
                other: "192.0.2.2:3479".parse().unwrap(),
                local: "10.0.0.2:5000".parse().unwrap(),
                mapping,
                filtering,
                hairpin: false,
                rfc5780: true,
                always_primary: false,
                contacted: Vec::new(),
            }
        }

        fn mapped_for(&self, dst: SocketAddr) -> SocketAddr {
            let port = match self.mapping {
                Mapping::EndpointIndependent => 40000,
                Mapping::AddressDependent => {
                    if dst.ip() == self.primary.ip() {
                        40000
                    } else {
                        40001
                    }
                }
                Mapping::AddressAndPortDependent => {
                    let last = match dst.ip() {
                        std::net::IpAddr::V4(v4) => u16::from(v4.octets()[3]),
                        std::net::IpAddr::V6(_) => 0,
                    };
                    40000 + last * 10 + dst.port() % 10
                }
            };
            SocketAddr::new("203.0.113.7".parse().unwrap(), port)
        }

        fn allowed(&self, from: SocketAddr) -> bool {
            match self.filtering {
                Filtering::EndpointIndependent => true,
                Filtering::AddressDependent => self.contacted.iter().any(|c| c.ip() == from.ip()),
                Filtering::AddressAndPortDependent => self.contacted.contains(&from),
            }
        }

        /// Server side: answers a request sent to `dst`; returns (from, response bytes).
        fn serve(&self, dst: SocketAddr, req: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
            let msg = Message::parse(req).unwrap();
            let change = msg
                .u32_attr(attr::CHANGE_REQUEST)
                .transpose()
                .unwrap()
                .unwrap_or(0);
            let ip = if change & attr::CHANGE_IP != 0 {
                if dst.ip() == self.primary.ip() {
                    self.other.ip()
                } else {
                    self.primary.ip()
                }
            } else {
                dst.ip()
            };
            let port = if change & attr::CHANGE_PORT != 0 {
                if dst.port() == self.primary.port() {
                    self.other.port()
                } else {
                    self.primary.port()
                }
            } else {
                dst.port()
            };
            let from = if self.always_primary {
                self.primary
            } else {
                SocketAddr::new(ip, port)
            };
            let mut buf = vec![0u8; 200];
            let mut b = MessageBuilder::new(
                &mut buf,
                method::BINDING,
                Class::Success,
                *msg.transaction_id(),
            )
            .unwrap();
            b.add_xor_address(attr::XOR_MAPPED_ADDRESS, self.mapped_for(dst))
                .unwrap();
            if self.rfc5780 {
                b.add_address(attr::OTHER_ADDRESS, self.other).unwrap();
            }
            let n = b.finish();
            buf.truncate(n);
            Some((from, buf))
        }

        fn run(&mut self, cfg: ProbeConfig) -> (Result<NatReport, ProbeError>, Duration) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut probe = NatProbe::new(self.primary, self.local, cfg, now);
            loop {
                let mut inbox = Vec::new();
                while let Some(t) = probe.poll_transmit() {
                    self.contacted.push(t.dst);
                    if t.dst == self.mapped_for(t.dst) {
                        if self.hairpin {
                            inbox.push((t.dst, t.payload.clone()));
                        }
                        continue;
                    }
                    if let Some((from, resp)) = self.serve(t.dst, &t.payload) {
                        if self.allowed(from) {
                            inbox.push((from, resp));
                        }
                    }
                }
                if let Some(out) = probe.take_outcome() {
                    return (out, now - t0);
                }
                if !inbox.is_empty() {
                    now += Duration::from_millis(10);
                    for (from, data) in inbox {
                        probe.handle_input(now, from, &data);
                    }
                    continue;
                }
                now = probe.poll_timeout().unwrap().max(now);
                probe.handle_timeout(now);
            }
        }
    }

    fn check(m: Mapping, f: Filtering, expect: NatType) {
        let mut w = World::new(m, f);
        let (out, _) = w.run(ProbeConfig::default());
        let r = out.unwrap();
        assert!(r.behind_nat);
        assert_eq!(r.mapping, Some(m), "{r:?}");
        assert_eq!(r.filtering, Some(f), "{r:?}");
        assert_eq!(r.nat_type, expect);
        assert_eq!(r.hairpinning, Some(false));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn every_nat_kind_is_classified() {
        use Filtering as F;
        use Mapping as M;
        check(
            M::EndpointIndependent,
            F::EndpointIndependent,
            NatType::FullCone,
        );
        check(
            M::EndpointIndependent,
            F::AddressDependent,
            NatType::RestrictedCone,
        );
        check(
            M::EndpointIndependent,
            F::AddressAndPortDependent,
            NatType::PortRestrictedCone,
        );
        check(
            M::AddressAndPortDependent,
            F::AddressAndPortDependent,
            NatType::Symmetric,
        );
        check(M::AddressDependent, F::AddressDependent, NatType::Symmetric);
    }

    #[test]
    fn hairpinning_detected() {
        let mut w = World::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        w.hairpin = true;
        let r = w.run(ProbeConfig::default()).0.unwrap();
        assert_eq!(r.hairpinning, Some(true));
    }

    #[test]
    fn a_server_answering_from_the_wrong_address_is_reported_not_misclassified() {
        // Behind a symmetric NAT that filters nothing, a server that always answers from its
        // primary address would make CHANGE-REQUEST look ignored and the alternate-address
        // mapping tests look answered: without the check, mapping would be concluded from
        // answers that did not come from the address the test is about.
        let mut w = World::new(
            Mapping::AddressAndPortDependent,
            Filtering::EndpointIndependent,
        );
        w.always_primary = true;
        let cfg = ProbeConfig {
            hairpin: false,
            ..ProbeConfig::default()
        };
        let r = w.run(cfg).0.unwrap();
        assert_eq!(r.filtering, None, "{r:?}");
        assert_eq!(r.mapping, None, "{r:?}");
        assert_eq!(r.nat_type, NatType::Unknown);
        let tests: Vec<_> = r.wrong_source.iter().map(|w| w.test).collect();
        assert_eq!(
            tests,
            vec!["filtering: change IP and port", "mapping: alternate IP"],
            "{r:?}"
        );
        assert_eq!(r.wrong_source[0].expected, w.other);
        assert_eq!(r.wrong_source[0].from, w.primary);
        assert_eq!(
            r.wrong_source[1].expected,
            SocketAddr::new(w.other.ip(), w.primary.port())
        );
    }

    #[test]
    fn no_other_address() {
        let mut w = World::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        w.rfc5780 = false;
        let cfg = ProbeConfig {
            hairpin: false,
            ..ProbeConfig::default()
        };
        let r = w.run(cfg).0.unwrap();
        assert!(!r.rfc5780);
        assert_eq!(r.public, "203.0.113.7:40000".parse().unwrap());
        assert_eq!(r.mapping, None);
        assert_eq!(r.nat_type, NatType::Unknown);
        assert_eq!(r.problems, vec![NO_RFC5780.to_owned()]);
    }

    #[test]
    fn silent_server_times_out_with_retransmissions() {
        let t0 = Instant::now();
        let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let mut probe = NatProbe::new(
            server,
            "10.0.0.2:5000".parse().unwrap(),
            ProbeConfig::default(),
            t0,
        );
        let mut sent = 0;
        let mut now = t0;
        loop {
            while probe.poll_transmit().is_some() {
                sent += 1;
            }
            if probe.outcome().is_some() {
                break;
            }
            now = probe.poll_timeout().unwrap();
            probe.handle_timeout(now);
        }
        assert_eq!(sent, 3);
        assert_eq!(now - t0, Duration::from_secs(3));
        let err = probe.take_outcome().unwrap().unwrap_err();
        assert_eq!(
            err.to_string(),
            "no response from 192.0.2.1:3478 after 3 transmissions in 3.0s"
        );
    }

    #[test]
    fn no_nat() {
        let mut w = World::new(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        w.local = w.mapped_for(w.primary);
        let r = w.run(ProbeConfig::default()).0.unwrap();
        assert!(!r.behind_nat);
        assert_eq!(r.nat_type, NatType::OpenInternet);
        assert_eq!(r.hairpinning, None);
    }
}
