// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {Signatures} from "./Signatures.sol";

/// @title QueryEscrow: pay-per-share escrow for fi-peer queries
/// @notice Theory of operation.
///
/// A querier opens a query with the k members of its committee, a price per
/// share and a deadline, and escrows exactly k * price. The contract stores one
/// 32-byte word per query: a commitment to those terms (querier, price,
/// deadline, committee). Every later call passes the terms again (the members
/// learnt them in their Accept message; they are also in `QueryOpened`), and the
/// contract checks them against the commitment. Storing a hash instead of the
/// committee keeps `openQuery` at one new storage slot and `settle` at one
/// storage read and one write per query.
///
///   openQuery ──► Open ──settle (all delivered, before deadline)──────────► Closed
///                  │  └──settle (some delivered, before deadline)──► Held ──refund──► Closed
///                  └──(deadline passes: claims allowed)────────────────────refund──► Closed
///
/// - settle / settleBatch (querier, until the deadline): credits the members who
///   delivered the price each; settleWeighted splits the same money among them
///   by the querier's reward rule, each at least MIN_SHARE_BPS of the price. If all delivered the query is closed. Otherwise the undelivered
///   shares stay *held* until deadline + claimGrace, so that a member the querier
///   left out, but who holds the querier's EIP-712 receipt for its share, can
///   still claim it. (Refunding them at once would let a querier take a share,
///   sign its receipt, and then settle without that member.)
/// - claim (anyone, for a member holding a receipt): on an Open query after the
///   deadline, or on a Held query at any time, until the query is closed.
/// - refund (anyone, after deadline + claimGrace): returns what is still held,
///   minus claims, to the querier and closes the query.
/// - withdraw: every credit and refund goes to an internal balance; accounts
///   pull their money out (no transfer ever happens inside settle/claim/refund).
///
/// Batching: `settleBatch` takes the batch's distinct members once, and per query
/// the committee as one-byte indexes into that list plus a delivered bitmap. The
/// contract rebuilds each committee in memory, checks it against the commitment,
/// sums every member's pay over the whole batch in memory, and then writes each
/// member's balance once: one storage write per member per batch, not per query.
///
/// Query-state word, per (querier, queryId): 0 = unknown; 1 = closed; top bits
/// 01 = open (commitment); top bits 11 = held (digest of the commitment and the
/// delivered bitmap). Query ids are scoped to their querier.
contract QueryEscrow {
    // ─── Constants ───────────────────────────────────────────────────────────
    /// @notice Largest committee: delivered bitmaps and member indexes fit in one word.
    uint256 public constant MAX_COMMITTEE = 32;
    /// @notice Most distinct members in one settleBatch (one-byte indexes).
    uint256 public constant MAX_BATCH_MEMBERS = 256;
    /// @notice settleWeighted: the least a delivered member is paid, in basis points
    /// of the price (10 %). Fixed in the code, so a member knows it before answering.
    uint256 public constant MIN_SHARE_BPS = 1_000;

    bytes32 private constant CLOSED = bytes32(uint256(1));
    uint256 private constant TAG_OPEN = 1 << 254;
    uint256 private constant TAG_HELD = 3 << 254;
    uint256 private constant TAG_MASK = 3 << 254;

    bytes32 public constant RECEIPT_TYPEHASH =
        keccak256("Receipt(bytes16 queryId,address member,uint256 amount)");
    bytes32 private constant DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    bytes32 private constant NAME_HASH = keccak256("fi-peer QueryEscrow");
    bytes32 private constant VERSION_HASH = keccak256("1");

    // ─── Types ───────────────────────────────────────────────────────────────
    /// @notice What openQuery committed to. `committee` is strictly ascending.
    struct Terms {
        address querier;
        address[] committee;
        uint128 price;
        uint64 deadline;
    }

    /// @notice One query of a settleBatch. Byte i of `memberIndex` (least
    /// significant first) is the index in `members` of committee[i]; bit i of
    /// `delivered` says whether committee[i] delivered its share.
    struct BatchItem {
        bytes16 queryId;
        uint128 price;
        uint64 deadline;
        uint8 size;
        uint256 memberIndex;
        uint256 delivered;
    }

    // ─── State ───────────────────────────────────────────────────────────────
    /// @notice Seconds after the deadline during which held shares can be claimed
    /// before anyone may refund the querier.
    uint64 public immutable claimGrace;
    uint256 private immutable _cachedChainId;
    bytes32 private immutable _cachedDomainSeparator;

    /// @notice Query-state word per querier and query id (see the theory of
    /// operation). Ids are per querier: the protocol gossips a query's id before the
    /// querier opens it, and a global namespace would let anyone block it by
    /// opening the same id first.
    mapping(address querier => mapping(bytes16 queryId => bytes32)) public queryState;
    /// @notice Claims per query: (total claimed << 32) | bitmap of claimed positions.
    mapping(address querier => mapping(bytes16 queryId => uint256)) public claims;
    /// @notice Withdrawable balance per account.
    mapping(address account => uint256) public balanceOf;

    bool private transient _locked;

    // ─── Events ──────────────────────────────────────────────────────────────
    event QueryOpened(
        bytes16 indexed queryId,
        address indexed querier,
        uint128 price,
        uint64 deadline,
        address[] committee
    );
    /// @notice `paid` = popcount(delivered) * price; the rest of the escrow is held.
    /// The querier is the transaction's sender (settle and settleBatch require it).
    event QuerySettled(bytes16 indexed queryId, uint256 delivered, uint256 paid);
    /// @notice A member's pay from one settle / settleBatch / settleWeighted transaction
    /// (all its queries in it).
    event Credited(address indexed member, uint256 amount);
    /// @notice After QuerySettled, for a settleWeighted: the pay of each committee seat
    /// (0 for a seat that did not deliver); they sum to QuerySettled.paid.
    event WeightedSettled(bytes16 indexed queryId, uint256[] amounts);
    event Claimed(
        bytes16 indexed queryId, address indexed member, address indexed querier, uint256 amount
    );
    event Refunded(bytes16 indexed queryId, address indexed querier, uint256 amount);
    event Withdrawn(address indexed account, uint256 amount);

    // ─── Errors ──────────────────────────────────────────────────────────────
    error QueryExists(bytes16 queryId);
    error UnknownQuery(bytes16 queryId);
    error QueryClosed(bytes16 queryId);
    error AlreadySettled(bytes16 queryId);
    error TermsMismatch(bytes16 queryId);
    error NotQuerier(bytes16 queryId);
    error BadCommitteeSize(bytes16 queryId, uint256 size);
    error CommitteeNotSorted(bytes16 queryId);
    error ZeroPrice(bytes16 queryId);
    error DeadlineInPast(bytes16 queryId);
    error WrongDeposit(bytes16 queryId, uint256 expected, uint256 sent);
    error SettlementClosed(bytes16 queryId);
    error BadDelivered(bytes16 queryId);
    error BadBatch();
    error BadMemberIndex(bytes16 queryId);
    error BadAmounts(bytes16 queryId);
    error BadWeight(bytes16 queryId, uint256 seat, uint256 amount);
    error NotConserved(bytes16 queryId, uint256 paid, uint256 total);
    error ClaimTooEarly(bytes16 queryId);
    error NotCommitteeMember(bytes16 queryId, address member);
    error AlreadyPaid(bytes16 queryId, address member);
    error AlreadyClaimed(bytes16 queryId, address member);
    error BadAmount(bytes16 queryId, uint256 amount);
    error InvalidReceipt(bytes16 queryId);
    error RefundTooEarly(bytes16 queryId, uint256 notBefore);
    error NothingToWithdraw();
    error TransferFailed();
    error Reentrancy();

    modifier nonReentrant() {
        if (_locked) revert Reentrancy();
        _locked = true;
        _;
        _locked = false;
    }

    constructor(uint64 claimGrace_) {
        claimGrace = claimGrace_;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    // ─── Querier ─────────────────────────────────────────────────────────────

    /// @notice Escrow k * price for a query. `committee` must be strictly ascending
    /// (no duplicates), 1..32 members; the caller is the querier.
    function openQuery(
        bytes16 queryId,
        address[] calldata committee,
        uint128 price,
        uint64 deadline
    ) external payable nonReentrant {
        if (queryState[msg.sender][queryId] != bytes32(0)) revert QueryExists(queryId);
        uint256 k = committee.length;
        if (k == 0 || k > MAX_COMMITTEE) revert BadCommitteeSize(queryId, k);
        address previous = address(0);
        for (uint256 i = 0; i < k; ++i) {
            address member = committee[i];
            if (member <= previous) revert CommitteeNotSorted(queryId);
            previous = member;
        }
        if (price == 0) revert ZeroPrice(queryId);
        if (deadline <= block.timestamp) revert DeadlineInPast(queryId);
        uint256 expected = k * uint256(price);
        if (msg.value != expected) revert WrongDeposit(queryId, expected, msg.value);

        queryState[msg.sender][queryId] = _commitment(msg.sender, price, deadline, committee);
        emit QueryOpened(queryId, msg.sender, price, deadline, committee);
    }

    /// @notice Settle one query: credit the members whose bit is set in `delivered`.
    function settle(bytes16 queryId, Terms calldata terms, uint256 delivered)
        external
        nonReentrant
    {
        if (msg.sender != terms.querier) revert NotQuerier(queryId);
        uint256 k = terms.committee.length;
        _checkSettlement(queryId, k, terms.deadline, delivered);
        bytes32 c = _commitment(terms.querier, terms.price, terms.deadline, terms.committee);
        uint256 price = terms.price;
        _closeOrHold(queryId, c, k, delivered, _popcount(delivered) * price);
        for (uint256 i = 0; i < k; ++i) {
            if ((delivered >> i) & 1 == 1) {
                address member = terms.committee[i];
                balanceOf[member] += price;
                emit Credited(member, price);
            }
        }
    }

    /// @notice Settle one query with the querier's reward rule (e.g. merit): the
    /// delivered shares' money, popcount(delivered) * price, is split among the
    /// members who delivered as `amounts` says (one per committee seat). Bounds:
    /// a delivered seat gets at least MIN_SHARE_BPS of the price, a seat that did
    /// not deliver gets 0, and the amounts sum to exactly popcount(delivered) *
    /// price, so the querier keeps nothing of what was delivered (its weights cost
    /// it nothing, so it has no reason to understate anyone) and a delivered
    /// member is never paid less than the floor. Undelivered shares are held for
    /// receipt claims exactly as in `settle`.
    function settleWeighted(
        bytes16 queryId,
        Terms calldata terms,
        uint256 delivered,
        uint256[] calldata amounts
    ) external nonReentrant {
        if (msg.sender != terms.querier) revert NotQuerier(queryId);
        uint256 k = terms.committee.length;
        _checkSettlement(queryId, k, terms.deadline, delivered);
        if (amounts.length != k) revert BadAmounts(queryId);
        bytes32 c = _commitment(terms.querier, terms.price, terms.deadline, terms.committee);
        uint256 price = terms.price;
        uint256 paid = _popcount(delivered) * price;
        _closeOrHold(queryId, c, k, delivered, paid);
        uint256 floor = (price * MIN_SHARE_BPS) / 10_000;
        uint256 total = 0;
        for (uint256 i = 0; i < k; ++i) {
            uint256 amount = amounts[i];
            if ((delivered >> i) & 1 == 1) {
                // amount <= paid also keeps `total` far from overflow (k <= 32)
                if (amount < floor || amount > paid) revert BadWeight(queryId, i, amount);
                total += amount;
                if (amount != 0) {
                    address member = terms.committee[i];
                    balanceOf[member] += amount;
                    emit Credited(member, amount);
                }
            } else if (amount != 0) {
                revert BadWeight(queryId, i, amount);
            }
        }
        if (total != paid) revert NotConserved(queryId, paid, total);
        emit WeightedSettled(queryId, amounts);
    }

    /// @notice Settle many queries of the caller at once; each member's balance is
    /// written once for the whole batch. See BatchItem for the encoding.
    function settleBatch(address[] calldata members, BatchItem[] calldata items)
        external
        nonReentrant
    {
        uint256 m = members.length;
        if (m == 0 || m > MAX_BATCH_MEMBERS || items.length == 0) revert BadBatch();
        uint256[] memory credit = new uint256[](m);
        // Scratch buffer for the commitment preimage, laid out exactly as
        // abi.encode(querier, price, deadline, committee): 5 head words + k words.
        uint256 buf;
        assembly ("memory-safe") {
            buf := mload(0x40)
            mstore(0x40, add(buf, mul(37, 32)))
            mstore(buf, caller())
            mstore(add(buf, 96), 0x80)
        }
        for (uint256 n = 0; n < items.length; ++n) {
            _settleItem(items[n], members, credit, buf);
        }
        for (uint256 j = 0; j < m; ++j) {
            uint256 amount = credit[j];
            if (amount != 0) {
                address member = members[j];
                balanceOf[member] += amount;
                emit Credited(member, amount);
            }
        }
    }

    /// One query of settleBatch: rebuild its committee in `buf`, add the pay of its
    /// delivered members to `credit`, check the commitment, close or hold it.
    function _settleItem(
        BatchItem calldata item,
        address[] calldata members,
        uint256[] memory credit,
        uint256 buf
    ) private {
        bytes16 queryId = item.queryId;
        uint256 k = item.size;
        uint256 delivered = item.delivered;
        uint256 price = item.price;
        {
            uint64 deadline = item.deadline;
            _checkSettlement(queryId, k, deadline, delivered);
            assembly ("memory-safe") {
                mstore(add(buf, 32), price)
                mstore(add(buf, 64), deadline)
                mstore(add(buf, 128), k)
            }
        }
        uint256 credits;
        assembly ("memory-safe") {
            credits := add(credit, 32) // first element of the credit array
        }
        (uint256 count, bool badIndex) =
            _fillSeats(members, credits, buf + 160, item.memberIndex, k, delivered, price);
        if (badIndex) revert BadMemberIndex(queryId);
        bytes32 c;
        assembly ("memory-safe") {
            c := or(shr(2, keccak256(buf, add(160, shl(5, k)))), TAG_OPEN)
        }
        _closeOrHold(queryId, c, k, delivered, count * price);
    }

    /// The hot loop of settleBatch, once per committee seat, in assembly: Solidity's
    /// bounds and overflow checks cost ~700 gas a seat here. Writes committee[i] =
    /// members[index byte i] to the memory words from `seat` on (the committee part
    /// of the commitment preimage) and adds `price` to the credit word of each
    /// delivered seat (`credits` points at the first). Safe without the checks: every j is
    /// compared with m (reported through `badIndex`); a credit sums at most 2^32
    /// prices below 2^128, so it cannot overflow; addresses are masked as
    /// abi.encode cleans them (the final credit loop reads members[] through
    /// Solidity's checked decoder).
    function _fillSeats(
        address[] calldata members,
        uint256 credits,
        uint256 seat,
        uint256 index,
        uint256 k,
        uint256 delivered,
        uint256 price
    ) private pure returns (uint256 count, bool badIndex) {
        assembly ("memory-safe") {
            let end := add(seat, shl(5, k))
            let m := members.length
            let base := members.offset
            let addressMask := sub(shl(160, 1), 1)
            for {} lt(seat, end) { seat := add(seat, 32) } {
                let j := and(index, 0xff)
                index := shr(8, index)
                badIndex := or(badIndex, iszero(lt(j, m)))
                mstore(seat, and(calldataload(add(base, shl(5, j))), addressMask))
                if and(delivered, 1) {
                    let slot := add(credits, shl(5, j))
                    mstore(slot, add(mload(slot), price))
                    count := add(count, 1)
                }
                delivered := shr(1, delivered)
            }
        }
    }

    // ─── Members ─────────────────────────────────────────────────────────────

    /// @notice Pay `member` the `amount` of a receipt the querier signed (EIP-712,
    /// see receiptDigest), if settlement did not already pay it. Callable by anyone
    /// (a relayer may submit it); the money goes to `member`'s balance.
    /// `delivered` is the bitmap of the settlement for a Held query, ignored otherwise.
    function claim(
        bytes16 queryId,
        Terms calldata terms,
        uint256 delivered,
        address member,
        uint256 amount,
        bytes calldata signature
    ) external nonReentrant {
        bytes32 c = _commitment(terms.querier, terms.price, terms.deadline, terms.committee);
        bytes32 state = queryState[terms.querier][queryId];
        if (state == c) {
            if (block.timestamp <= terms.deadline) revert ClaimTooEarly(queryId);
            delivered = 0;
        } else if (state != _held(c, delivered)) {
            _revertOnState(queryId, state, false);
        }
        uint256 i = _position(queryId, terms.committee, member);
        if ((delivered >> i) & 1 == 1) revert AlreadyPaid(queryId, member);
        uint256 claimed = claims[terms.querier][queryId];
        if ((claimed >> i) & 1 == 1) revert AlreadyClaimed(queryId, member);
        if (amount == 0 || amount > terms.price) revert BadAmount(queryId, amount);
        address signer = Signatures.recover(receiptDigest(queryId, member, amount), signature);
        if (signer == address(0) || signer != terms.querier) revert InvalidReceipt(queryId);

        claims[terms.querier][queryId] =
            (((claimed >> 32) + amount) << 32) | (claimed & 0xffffffff) | (1 << i);
        balanceOf[member] += amount;
        emit Claimed(queryId, member, terms.querier, amount);
    }

    // ─── Anyone ──────────────────────────────────────────────────────────────

    /// @notice After deadline + claimGrace, return what is still held (minus claims)
    /// to the querier's balance and close the query. `delivered`: as for claim.
    function refund(bytes16 queryId, Terms calldata terms, uint256 delivered)
        external
        nonReentrant
    {
        bytes32 c = _commitment(terms.querier, terms.price, terms.deadline, terms.committee);
        bytes32 state = queryState[terms.querier][queryId];
        uint256 k = terms.committee.length;
        uint256 heldShares;
        if (state == c) {
            heldShares = k;
        } else if (state == _held(c, delivered)) {
            heldShares = k - _popcount(delivered);
        } else {
            _revertOnState(queryId, state, false);
        }
        uint256 notBefore = uint256(terms.deadline) + claimGrace;
        if (block.timestamp <= notBefore) revert RefundTooEarly(queryId, notBefore + 1);

        uint256 amount = heldShares * uint256(terms.price) - (claims[terms.querier][queryId] >> 32);
        queryState[terms.querier][queryId] = CLOSED;
        delete claims[terms.querier][queryId];
        balanceOf[terms.querier] += amount;
        emit Refunded(queryId, terms.querier, amount);
    }

    /// @notice Send the caller its whole balance (pull payment).
    function withdraw() external nonReentrant {
        uint256 amount = balanceOf[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        balanceOf[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    // ─── Views ───────────────────────────────────────────────────────────────

    /// @notice The EIP-712 domain separator (name "fi-peer QueryEscrow", version "1").
    function domainSeparator() public view returns (bytes32) {
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @notice The EIP-712 digest a querier signs for a member's receipt.
    function receiptDigest(bytes16 queryId, address member, uint256 amount)
        public
        view
        returns (bytes32)
    {
        bytes32 structHash = keccak256(abi.encode(RECEIPT_TYPEHASH, queryId, member, amount));
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    /// @notice The state word an open query with these terms has (members check
    /// `queryState(querier, queryId) == commitmentOf(...)` before answering).
    function commitmentOf(address querier, uint128 price, uint64 deadline, address[] calldata committee)
        external
        pure
        returns (bytes32)
    {
        return _commitment(querier, price, deadline, committee);
    }

    // ─── Internals ───────────────────────────────────────────────────────────

    function _checkSettlement(bytes16 queryId, uint256 k, uint64 deadline, uint256 delivered)
        private
        view
    {
        if (k == 0 || k > MAX_COMMITTEE) revert BadCommitteeSize(queryId, k);
        if (delivered >> k != 0) revert BadDelivered(queryId);
        if (block.timestamp > deadline) revert SettlementClosed(queryId);
    }

    /// Checks the caller's open commitment, then closes the query (all delivered)
    /// or holds the rest. The caller is the querier (settle checks, settleBatch uses it).
    function _closeOrHold(bytes16 queryId, bytes32 c, uint256 k, uint256 delivered, uint256 paid)
        private
    {
        mapping(bytes16 => bytes32) storage states = queryState[msg.sender];
        bytes32 state = states[queryId];
        if (state != c) _revertOnState(queryId, state, true);
        states[queryId] = delivered == (1 << k) - 1 ? CLOSED : _held(c, delivered);
        emit QuerySettled(queryId, delivered, paid);
    }

    function _revertOnState(bytes16 queryId, bytes32 state, bool settling) private pure {
        if (state == bytes32(0)) revert UnknownQuery(queryId);
        if (state == CLOSED) revert QueryClosed(queryId);
        if (settling && uint256(state) & TAG_MASK == TAG_HELD) revert AlreadySettled(queryId);
        revert TermsMismatch(queryId);
    }

    function _commitment(address querier, uint128 price, uint64 deadline, address[] calldata committee)
        private
        pure
        returns (bytes32)
    {
        uint256 h = uint256(keccak256(abi.encode(querier, price, deadline, committee)));
        return bytes32((h >> 2) | TAG_OPEN);
    }

    function _held(bytes32 c, uint256 delivered) private pure returns (bytes32 digest) {
        assembly ("memory-safe") {
            mstore(0x00, c)
            mstore(0x20, delivered)
            digest := or(shr(2, keccak256(0x00, 0x40)), TAG_HELD)
        }
    }

    function _position(bytes16 queryId, address[] calldata committee, address member)
        private
        pure
        returns (uint256)
    {
        uint256 k = committee.length; // <= MAX_COMMITTEE: checked by openQuery
        for (uint256 i = 0; i < k; ++i) {
            if (committee[i] == member) return i;
        }
        revert NotCommitteeMember(queryId, member);
    }

    function _popcount(uint256 x) private pure returns (uint256 count) {
        while (x != 0) {
            x &= x - 1;
            ++count;
        }
    }


    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this))
        );
    }
}
