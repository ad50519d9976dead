from twisted.application.service import ServiceMaker

mcproxy = ServiceMaker(
    "mcproxy",
    "mcproxy.app.tap",
    "A memcached proxy whose routes are scripted in Lua.",
    "mcproxy",
)
