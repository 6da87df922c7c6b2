-- netdrop.lua: Wireshark/tshark postdissector for captures written by `netdrop capture`.
--
-- Each packet of such a capture carries its drop verdict as a packet comment
-- ("netdrop reason=NETFILTER_DROP classification=netfilter_rule ... dst_pod=default/web-2");
-- this turns the comment into filterable fields:
--
--   tshark -X lua_script:netdrop.lua -r incident.pcapng \
--       -Y 'netdrop.reason == "NETFILTER_DROP" && netdrop.dst_pod contains "web"'
--
-- Install for Wireshark: copy to ~/.local/lib/wireshark/plugins/ (Help > About > Folders).
-- Values never contain spaces (netdrop writes `_` instead), so the comment splits on
-- whitespace. Keys netdrop adds later show up under "other" until this file names them.

local netdrop = Proto("netdrop", "netdrop drop verdict")

-- key in the comment -> ProtoField; numbers are typed so `netdrop.netns == 4026531840` works.
local fields = {
    reason = ProtoField.string("netdrop.reason", "Drop reason"),
    reason_code = ProtoField.uint32("netdrop.reason_code", "Drop reason number (this kernel's)"),
    classification = ProtoField.string("netdrop.classification", "Classification"),
    certainty = ProtoField.string("netdrop.certainty", "Certainty"),
    effect = ProtoField.string("netdrop.effect", "Effect"),
    location = ProtoField.string("netdrop.location", "Kernel location"),
    node = ProtoField.string("netdrop.node", "Node"),
    netns = ProtoField.uint32("netdrop.netns", "Network namespace"),
    ifname = ProtoField.string("netdrop.ifname", "Interface"),
    proto = ProtoField.string("netdrop.proto", "Protocol"),
    src = ProtoField.string("netdrop.src", "Source"),
    dst = ProtoField.string("netdrop.dst", "Destination"),
    src_pod = ProtoField.string("netdrop.src_pod", "Source pod"),
    dst_pod = ProtoField.string("netdrop.dst_pod", "Destination pod"),
    service = ProtoField.string("netdrop.service", "Service"),
    orig_src = ProtoField.string("netdrop.orig_src", "Source before NAT"),
    orig_dst = ProtoField.string("netdrop.orig_dst", "Destination before NAT"),
    conntrack = ProtoField.string("netdrop.conntrack", "Conntrack state"),
    tcp_flags = ProtoField.string("netdrop.tcp_flags", "TCP flags"),
    time = ProtoField.string("netdrop.time", "Drop time (UTC)"),
}
local numeric = { reason_code = true, netns = true }
local other = ProtoField.string("netdrop.other", "Other")

local list = { other }
for _, f in pairs(fields) do
    list[#list + 1] = f
end
netdrop.fields = list

local comment_field = Field.new("frame.comment")
local PREFIX = "netdrop "

function netdrop.dissector(tvb, pinfo, tree)
    for _, c in ipairs({ comment_field() }) do
        local text = tostring(c.value)
        if text:sub(1, #PREFIX) == PREFIX then
            local body = text:sub(#PREFIX + 1)
            local sub = tree:add(netdrop, "netdrop: " .. body)
            for key, value in body:gmatch("(%S+)=(%S*)") do
                local f = fields[key]
                if f == nil then
                    sub:add(other, key .. "=" .. value)
                elseif numeric[key] then
                    local n = tonumber(value)
                    if n ~= nil then
                        sub:add(f, n)
                    end
                else
                    sub:add(f, value)
                end
            end
        end
    end
end

-- `true`: every field is filled on the first pass, so -Y filters on them in one pass.
register_postdissector(netdrop, true)
