//! The IPv6 side of the end-to-end benchmark: lb with an IPv6 VIP and the
//! 3 backends' IPv6 addresses (dsr-l2, ipip = 6in6, GUE over IPv6), fed
//! the same one-flow UDP flood as the IPv4 rows. The topology is the
//! same, with its IPv6 option (2001:2:0:k::/64, VIP 2001:2:0:1kk::1 on
//! the backends' lo).

use lb_tests::{agent::VipSpec, netns::Topology, packet::Ipv6Packet};

use super::{FRAME_PAYLOAD, UDP_PORT, UDP_SRC_PORT};

/// The generator's IPv6 frame: Ethernet + IPv6 + UDP + the IPv4 flood's
/// payload (18 bytes) = 80 bytes, from the client to the IPv6 VIP.
pub(super) fn udp_frame(t: &Topology) -> Vec<u8> {
    let mut p = Ipv6Packet::udp(t.client_addr6(), UDP_SRC_PORT, t.vip6(), UDP_PORT);
    p.dst_mac = t.lb_mac();
    p.src_mac = t.client_mac();
    p.payload = vec![0x5a; FRAME_PAYLOAD];
    p.build()
}

/// The flood's VIP: UDP to the IPv6 VIP over the backends' IPv6
/// addresses, no health checks (nothing listens: the sink drops it all).
pub(super) fn flood_vip(t: &Topology, forwarding: &'static str) -> VipSpec {
    let backends: Vec<_> = (0..t.backend_count()).map(|i| t.backend_addr6(i)).collect();
    let mut flood = VipSpec::tcp("flood6", t.vip6(), UDP_PORT, &backends);
    flood.protocol = "udp";
    flood.health_check = "kind = \"none\"".into();
    flood.forwarding = forwarding;
    flood
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use lb_tests::{
        packet::{Ipv4Packet, Ipv6Packet},
        testprogs::{self, TestProgs},
    };

    use super::super::{FRAME_PAYLOAD, UDP_PORT, UDP_SRC_PORT};

    const XDP_TX: u32 = 3;

    fn v6_frame(src: u16, payload: u8) -> Vec<u8> {
        let mut p = Ipv6Packet::udp(
            Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, src),
            UDP_SRC_PORT,
            Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1),
            UDP_PORT,
        );
        p.payload = vec![payload; FRAME_PAYLOAD];
        p.build()
    }

    #[test]
    fn generator_frame_v6_is_80_bytes_with_62_bytes_of_headers() {
        let f = v6_frame(1, 0);
        assert_eq!(f.len(), 80);
        assert_eq!(f.len() - FRAME_PAYLOAD, 62);
    }

    /// The generator stamps all 62 header bytes of an IPv6 frame (so a
    /// pushed or rewritten header never comes back in a recycled live
    /// frame), and still only 48 bytes of an IPv4 frame: a 60-byte IPv4
    /// flood frame keeps its payload and is not left alone for being
    /// shorter than 64 bytes.
    #[test]
    fn the_generator_stamps_64_bytes_of_an_ipv6_template_and_48_of_an_ipv4_one() {
        lb_tests::require_root();
        let mut progs = TestProgs::load().unwrap();
        let template = v6_frame(1, 0x5a);
        // Another flow with another payload: every stamped byte differs
        // from the template somewhere in the first 64 bytes.
        let frame = v6_frame(7, 0xa5);
        assert_ne!(frame[..64], template[..64]);
        progs.set_gen_template(&template).unwrap();
        let r = progs.run(testprogs::GEN_TX, &frame).unwrap();
        assert_eq!(r.action, XDP_TX);
        assert_eq!(r.frame[..64], template[..64]);
        assert_eq!(r.frame[64..], frame[64..]);

        let v4 = |src: u8, payload: u8| {
            let mut p = Ipv4Packet::udp(
                Ipv4Addr::new(198, 18, 0, src),
                UDP_SRC_PORT,
                Ipv4Addr::new(198, 19, 0, 1),
                UDP_PORT,
            );
            p.payload = vec![payload; FRAME_PAYLOAD];
            p.build()
        };
        let (template, frame) = (v4(1, 0x5a), v4(7, 0xa5));
        assert_eq!(frame.len(), 60);
        progs.set_gen_template(&template).unwrap();
        let r = progs.run(testprogs::GEN_TX, &frame).unwrap();
        assert_eq!(r.action, XDP_TX);
        assert_eq!(r.frame[..48], template[..48]);
        assert_eq!(r.frame[48..], frame[48..]);
        assert_ne!(r.frame[48..], template[48..]);
    }

    #[test]
    fn a_template_shorter_than_its_stamp_is_refused() {
        lb_tests::require_root();
        let mut progs = TestProgs::load().unwrap();
        let short = &v6_frame(1, 0)[..63];
        let e = progs.set_gen_template(short).unwrap_err().to_string();
        assert!(e.contains("63-byte") && e.contains("64 bytes"), "{e}");
    }
}
