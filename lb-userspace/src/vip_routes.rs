//! The announce table over rtnetlink: host routes `ADDR/32` (`/128`)
//! `dev DEVICE table TABLE proto PROTOCOL` in the agent's network namespace,
//! one per announced VIP address, for a routing daemon to import (BIRD's
//! `protocol kernel { kernel table T; learn; }`, FRR's `redistribute
//! table T`). The routes of PROTOCOL in TABLE are the agent's: those found
//! at start are taken over. What to announce is decided in
//! `agent::announce`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, anyhow};
use futures_util::TryStreamExt;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    },
};

use crate::config::AnnounceSettings;

/// The agent's routes in the announce table.
pub struct VipRoutes {
    handle: Handle,
    settings: AnnounceSettings,
    ifindex: u32,
}

/// A netlink error's errno (positive), if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl VipRoutes {
    /// Opens a request socket (its connection runs as a task of the
    /// current tokio runtime); the device must exist.
    pub fn connect(settings: &AnnounceSettings) -> anyhow::Result<Self> {
        let ifindex = crate::datapath::ifindex(&settings.device).map_err(|_| {
            anyhow!(
                "[agent.announce] device {:?} does not exist (check `ip link`)",
                settings.device
            )
        })?;
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket for VIP routes")?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            settings: settings.clone(),
            ifindex,
        })
    }

    pub fn settings(&self) -> &AnnounceSettings {
        &self.settings
    }

    /// The host routes of the agent's protocol in the table, both
    /// families: the addresses an earlier agent (or this one) announced.
    pub async fn list(&self) -> anyhow::Result<BTreeSet<IpAddr>> {
        let mut out = BTreeSet::new();
        let dumps = [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ];
        for msg in dumps {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .context("listing routes")?;
            out.extend(routes.iter().filter_map(|r| self.ours(r)));
        }
        Ok(out)
    }

    /// The address of `r` if it is one of the agent's host routes.
    fn ours(&self, r: &RouteMessage) -> Option<IpAddr> {
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(r.header.table.into());
        if table != self.settings.table
            || r.header.protocol != RouteProtocol::from(self.settings.protocol)
        {
            return None;
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        })?;
        let host = if dst.is_ipv4() { 32 } else { 128 };
        (r.header.destination_prefix_length == host).then_some(dst)
    }

    /// The route of `addr`, as `ip route add ADDR/32 dev DEVICE table T
    /// proto P` makes it (IPv4: scope link).
    fn message(&self, addr: IpAddr, scope: Option<RouteScope>) -> RouteMessage {
        let mut m = match addr {
            IpAddr::V4(a) => {
                let b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(a, 32)
                    .scope(scope.unwrap_or(RouteScope::Link));
                Self::common(b, &self.settings).build()
            }
            IpAddr::V6(a) => {
                let b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(a, 128)
                    .scope(scope.unwrap_or(RouteScope::Universe));
                Self::common(b, &self.settings).build()
            }
        };
        if self.settings.table > 255 {
            m.header.table = RouteHeader::RT_TABLE_UNSPEC;
        }
        m
    }

    fn common<T>(b: RouteMessageBuilder<T>, s: &AnnounceSettings) -> RouteMessageBuilder<T> {
        b.table_id(s.table)
            .protocol(RouteProtocol::from(s.protocol))
    }

    /// Adds (or replaces) the route of `addr`.
    pub async fn add(&self, addr: IpAddr) -> anyhow::Result<()> {
        let mut m = self.message(addr, None);
        m.attributes.push(RouteAttribute::Oif(self.ifindex));
        self.handle
            .route()
            .add(m)
            .replace()
            .execute()
            .await
            .with_context(|| {
                format!(
                    "adding the route {addr} dev {} table {} proto {}",
                    self.settings.device, self.settings.table, self.settings.protocol
                )
            })
    }

    /// Removes the route of `addr` (of the agent's protocol, whatever its
    /// device); one already gone is no error.
    pub async fn del(&self, addr: IpAddr) -> anyhow::Result<()> {
        // Scope "nowhere" matches any scope on delete (as `ip route del`).
        let m = self.message(addr, Some(RouteScope::NoWhere));
        match self.handle.route().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(anyhow::Error::from(e).context(format!(
                "removing the route {addr} table {} proto {}",
                self.settings.table, self.settings.protocol
            ))),
        }
    }
}
